//! Connection strings carry passwords; this wrapper keeps them out of logs,
//! `Debug` output, status, reports and metric labels. The only way to the
//! real value is [`SecretUri::expose`], called where a driver is built.

use serde::{Deserialize, Deserializer};
use std::fmt;

/// A URI that may embed credentials (`scheme://user:password@host/...`).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUri(String);

impl SecretUri {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The raw URI, password included. Only hand this to a driver.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URI with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_uri(&self.0)
    }
}

impl fmt::Debug for SecretUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for SecretUri {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(SecretUri)
    }
}

/// Replace the password of every `user:password@` userinfo in `text` by `***`,
/// and any `password=` query parameter. Written by hand because the `url` crate
/// cannot parse MongoDB seed lists (`mongodb://u:p@h1,h2/`), and this must also
/// work on free text such as driver error messages.
pub fn redact_uri(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c == '?' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    redact_query_password(&out)
}

fn redact_query_password(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.to_ascii_lowercase().find("password=") {
        let (head, tail) = rest.split_at(pos + "password=".len());
        out.push_str(head);
        out.push_str("***");
        let end = tail.find(['&', ' ', '"', '\'']).unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_in_mongodb_seed_list() {
        let s = redact_uri("mongodb://admin:hunter2@h1:27017,h2:27017/db?authSource=admin");
        assert_eq!(
            s,
            "mongodb://admin:***@h1:27017,h2:27017/db?authSource=admin"
        );
    }

    #[test]
    fn redacts_password_query_parameter_and_keeps_plain_uris() {
        assert_eq!(
            redact_uri("postgres://u@h/db?password=hunter2&sslmode=require"),
            "postgres://u@h/db?password=***&sslmode=require"
        );
        assert_eq!(redact_uri("sqlite://state/x.db"), "sqlite://state/x.db");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = SecretUri::new("postgres://root:s3cr3t@localhost/db");
        assert!(!format!("{s:?} {s}").contains("s3cr3t"));
    }
}
