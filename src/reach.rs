//! Why the source or the target could not be reached, and what to do about it: the words of
//! every connection failure, in one place. Each backend sorts its driver's errors into a
//! [`Cause`] (`source/reach.rs`, `sink/reach.rs`); [`Unreachable`] says it, with the
//! (redacted) address and the setting to fix. The driver's own text goes to the debug log,
//! not to the operator, unless nothing better is known.

use crate::secret::{redact_uri, SecretUri};
use std::fmt;
use std::time::Duration;

/// Which end of the sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Target => "target",
        }
    }

    /// The setting that holds its address.
    fn key(self) -> &'static str {
        match self {
            Side::Source => "source.uri",
            Side::Target => "target.url",
        }
    }
}

/// What went wrong, as far as the driver's error tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The server refused the user or the password (MongoDB SCRAM, PostgreSQL 28P01/28000).
    AuthFailed,
    /// The user is known but lacks a right (MongoDB 13, PostgreSQL 42501).
    NotAuthorized,
    /// Nothing listens at the address (TCP connection refused).
    Refused,
    /// The host name does not resolve.
    HostUnknown,
    /// The named database does not exist on the server.
    DatabaseMissing(String),
    /// No answer within the timeout.
    TimedOut(Duration),
    /// The TLS handshake or the certificate check failed.
    Tls,
    /// A local SQLite file or its folder cannot be opened or created.
    FileUnusable,
    /// Anything else; the driver's (redacted) text is all there is.
    Other,
}

/// A failed connection attempt, worded for the operator.
#[derive(Debug)]
pub struct Unreachable {
    pub side: Side,
    pub cause: Cause,
    /// The address, redacted.
    pub at: String,
    /// What the server said, when it is short and says more than the cause (a PostgreSQL
    /// error message such as `role "x" does not exist`); redacted.
    pub said: Option<String>,
    /// The driver's full text, redacted: shown only for [`Cause::Other`].
    pub detail: String,
}

impl Unreachable {
    pub fn new(side: Side, cause: Cause, at: &SecretUri, detail: &str) -> Self {
        Unreachable {
            side,
            cause,
            at: at.redacted(),
            said: None,
            detail: redact_uri(detail),
        }
    }

    /// Add the server's own short message.
    pub fn said(mut self, message: &str) -> Self {
        self.said = Some(redact_uri(message));
        self
    }

    /// What happened, in a few words (no advice): `--connect`'s FAIL lines start with it.
    pub fn what(&self) -> String {
        let what = match &self.cause {
            Cause::AuthFailed => "authentication failed".to_string(),
            Cause::NotAuthorized => "not authorized".to_string(),
            Cause::Refused => "connection refused".to_string(),
            Cause::HostUnknown => "host name not found".to_string(),
            Cause::DatabaseMissing(db) => format!("database \"{db}\" does not exist"),
            Cause::TimedOut(d) => format!(
                "timed out after {}",
                crate::settings::human::fmt_duration(*d)
            ),
            Cause::Tls => "TLS handshake failed".to_string(),
            Cause::FileUnusable => "cannot open or create the SQLite file".to_string(),
            Cause::Other => self.detail.clone(),
        };
        match &self.said {
            Some(said) if self.cause != Cause::Other => format!("{what} ({said})"),
            _ => what,
        }
    }

    /// What to do about it.
    pub fn fix(&self) -> String {
        let key = self.side.key();
        match (&self.cause, self.side) {
            (Cause::AuthFailed, Side::Source) => format!(
                "check the user name and password in {key}, and authSource= (the database the \
                 user was created in, often admin)"
            ),
            (Cause::AuthFailed, Side::Target) => format!(
                "check the user name and password in {key}, that the role exists, and that \
                 pg_hba.conf lets it in from this host"
            ),
            (Cause::NotAuthorized, Side::Source) => {
                "grant the user the read role on source.database".to_string()
            }
            (Cause::NotAuthorized, Side::Target) => {
                "grant the role CONNECT on the database and CREATE and USAGE on its schema".into()
            }
            (Cause::Refused, _) => format!(
                "nothing listens at that host and port: start the server, or fix the host and \
                 port in {key}"
            ),
            (Cause::HostUnknown, _) => format!("fix the host name in {key}, or check DNS"),
            (Cause::DatabaseMissing(db), _) => format!(
                "create it (createdb {db}, or CREATE DATABASE \"{db}\"), or fix the database name \
                 in {key}"
            ),
            (Cause::TimedOut(_), Side::Source) => format!(
                "check the host, port and firewall in {key}; for a replica set, that its members' \
                 names resolve from here (or add directConnection=true for one server); \
                 source.connect_timeout sets the wait"
            ),
            (Cause::TimedOut(_), Side::Target) => format!(
                "check the host, port and firewall in {key}, and that the server accepts \
                 connections (max_connections)"
            ),
            (Cause::Tls, Side::Source) => format!(
                "check the TLS options in {key}: tlsCAFile naming the CA that signed the \
                 server's certificate, and a host name the certificate was issued for \
                 (docs/OPERATIONS.md, TLS)"
            ),
            (Cause::Tls, Side::Target) => format!(
                "check the TLS settings in {key}: sslmode=verify-full needs the host name the \
                 server's certificate was issued for and sslrootcert naming the CA that signed \
                 it (docs/OPERATIONS.md, TLS)"
            ),
            (Cause::FileUnusable, _) => format!(
                "check that the folder of the file in {key} exists or can be created, and that \
                 this user may write there"
            ),
            (Cause::Other, _) => format!("check {key} and that the server runs"),
        }
    }
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot connect to the {} at {} ({}): {}. What to do: {}",
            self.side.name(),
            self.at,
            self.side.key(),
            self.what(),
            self.fix()
        )
    }
}

impl std::error::Error for Unreachable {}

/// Sort an I/O error met while connecting (a refused or timed-out TCP connect, a name that
/// does not resolve).
pub fn io_cause(e: &std::io::Error, timeout: Duration) -> Cause {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => Cause::Refused,
        ErrorKind::TimedOut => Cause::TimedOut(timeout),
        _ if is_tls_text(&e.to_string()) => Cause::Tls,
        _ if is_dns_text(&e.to_string()) => Cause::HostUnknown,
        _ => Cause::Other,
    }
}

/// Whether a driver's text is about TLS (rustls' and OpenSSL's wordings). Checked before
/// [`is_dns_text`]: a certificate error names the certificate's `DnsName`s.
pub fn is_tls_text(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "certificate",
        "unknownissuer",
        "notvalidforname",
        "handshake",
        "tls",
        "ssl",
    ]
    .iter()
    .any(|w| t.contains(w))
}

/// Whether a driver's text says a host name did not resolve (the resolvers' wordings).
pub fn is_dns_text(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "failed to lookup address",
        "name or service not known",
        "nodename nor servname",
        "no such host",
        "temporary failure in name resolution",
        "dns resolution",
    ]
    .iter()
    .any(|w| t.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_what_and_what_to_do_without_the_password() {
        let uri = SecretUri::new("postgres://app:hunter2secret@db:5432/v3");
        let e = Unreachable::new(Side::Target, Cause::AuthFailed, &uri, "raw hunter2secret")
            .said("password authentication failed for user \"app\"");
        let text = e.to_string();
        assert!(text.contains("authentication failed"), "{text}");
        assert!(
            text.contains("What to do:") && text.contains("pg_hba.conf"),
            "{text}"
        );
        assert!(!text.contains("hunter2secret"), "{text}");
        let missing = Unreachable::new(Side::Target, Cause::DatabaseMissing("v3".into()), &uri, "");
        assert!(missing
            .to_string()
            .contains("database \"v3\" does not exist"));
    }

    #[test]
    fn io_errors_are_sorted() {
        let t = Duration::from_secs(5);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(io_cause(&refused, t), Cause::Refused);
        let dns = std::io::Error::other(
            "failed to lookup address information: Name or service not known",
        );
        assert_eq!(io_cause(&dns, t), Cause::HostUnknown);
    }
}
