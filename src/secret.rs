//! Credentials never reach an output: [`SecretUri`] hides its connection string in `Debug`,
//! `Display`, status, reports and metric labels, and [`redact_uri`] hides credentials in any
//! free text (driver errors, log lines) whether or not the connection string in it is
//! well-formed. The only way to a raw value is [`SecretUri::expose`], called where a driver
//! is built.
//!
//! Two layers, each enough on its own for the usual forms:
//! 1. Patterns: the password of every `scheme://user:password@host` (up to the LAST `@`
//!    before the host, so unencoded `@ / : ? #` in a password stay hidden), and the value
//!    of every option that carries a secret ([`SECRET_OPTIONS`], [`SECRET_WORDS`]) in a
//!    query string (`?password=…`), a libpq conninfo (`password='…'`) or `key: value` text.
//! 2. Known values: every secret a [`SecretUri`] held when it was built is remembered
//!    (raw, percent-decoded, escaped, and its pieces between reserved characters), and any
//!    later occurrence in an output is masked, whatever the text around it. This catches
//!    drivers that echo part of a malformed URI (MongoDB's "got {port}") or an option's
//!    value without its name (sqlx's "ignoring unrecognized connect parameter").
//!
//! When unsure where a secret ends, more is hidden, never less: an `@` in the options
//! after the host hides the host too.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::io::{self, Write};
use std::ops::Range;
use std::sync::RwLock;

/// What a hidden value is replaced by.
pub const MASK: &str = "***";

/// Connection-string options whose value is a credential, from the drivers' documentation
/// (lower case, without `_`, `-` and `.`, the form [`is_secret_option`] compares).
/// MongoDB (connection string options, mongodb crate 3): `authMechanismProperties`
/// (`AWS_SESSION_TOKEN`, OIDC `TOKEN_RESOURCE`, …: the whole value is hidden),
/// `tlsCertificateKeyFilePassword`, the legacy `sslClientCertificateKeyPassword` and
/// `sslPEMKeyPassword`, and the SOCKS5 `proxyPassword`. PostgreSQL (libpq connection
/// parameters, sqlx `PgConnectOptions`): `password`, `sslpassword`, `oauth_client_secret`.
/// AWS credentials given as options by some tools: `aws_session_token`,
/// `aws_secret_access_key`.
pub const SECRET_OPTIONS: &[&str] = &[
    "authmechanismproperties",
    "tlscertificatekeyfilepassword",
    "sslclientcertificatekeypassword",
    "sslpemkeypassword",
    "proxypassword",
    "password",
    "sslpassword",
    "oauthclientsecret",
    "awssessiontoken",
    "awssecretaccesskey",
];

/// Any option whose normalized name contains one of these is treated as secret too, so
/// options a driver adds later (`…password`, `…secret`, `…token`) are covered unnamed.
pub const SECRET_WORDS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "credential",
    "apikey",
];

/// Shorter remembered values are not masked as free text (they would mask ordinary words);
/// the patterns still hide them where they stand in a connection string.
pub const MIN_KNOWN_LEN: usize = 4;

/// Secrets seen in any [`SecretUri`] of this process, longest first.
static KNOWN: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// A connection string that may embed credentials (`scheme://user:password@host/...?...`).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUri(String);

impl SecretUri {
    pub fn new(s: impl Into<String>) -> Self {
        let s = s.into();
        remember_secrets_of(&s);
        Self(s)
    }

    /// The raw URI, secrets included. Only hand this to a driver.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URI with every credential replaced by `***`; the host stays readable.
    pub fn redacted(&self) -> String {
        let spans = secret_spans(&self.0, whole_mode(&self.0));
        scrub_known(&apply(&self.0, &spans))
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

/// Serialized redacted (as `Display`): a serialized setting is for people to read.
impl Serialize for SecretUri {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for SecretUri {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(SecretUri::new)
    }
}

/// Hide every credential in free text: passwords of connection strings, values of secret
/// options, and any value a [`SecretUri`] of this process holds. Written by hand because
/// no parser accepts what must be handled here: MongoDB seed lists (`mongodb://u:p@h1,h2/`),
/// unencoded reserved characters in passwords, and connection strings inside messages.
pub fn redact_uri(text: &str) -> String {
    redact_json_text(text).unwrap_or_else(|| scrub_known(&redact_patterns(text)))
}

/// A JSON document (a report, a JSON log line) is redacted string by string, so a secret's
/// span never runs across values and the document keeps its shape; pretty-printed stays
/// pretty. `None`: not JSON.
fn redact_json_text(text: &str) -> Option<String> {
    let t = text.trim();
    if !(t.starts_with('{') || t.starts_with('[')) {
        return None;
    }
    let mut v: serde_json::Value = serde_json::from_str(t).ok()?;
    let before = v.clone();
    redact_json(&mut v);
    if v == before {
        return Some(text.to_string());
    }
    let body = if t.contains('\n') {
        serde_json::to_string_pretty(&v).ok()?
    } else {
        v.to_string()
    };
    let lead = &text[..text.len() - text.trim_start().len()];
    let tail = &text[text.trim_end().len()..];
    Some(format!("{lead}{body}{tail}"))
}

/// Layer 1 only (no remembered values): what the patterns alone hide in free text.
pub fn redact_patterns(text: &str) -> String {
    apply(text, &secret_spans(text, Mode::Text))
}

/// [`redact_uri`] on every string of a JSON value (object keys stay), so a JSON document
/// (a report, a JSON log line) stays valid JSON with the same shape.
pub fn redact_json(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::String(s) => {
            let r = redact_uri(s);
            if r != *s {
                *s = r;
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact_json),
        Value::Object(o) => o.values_mut().for_each(redact_json),
        _ => {}
    }
}

/// A writer that holds one log event and writes it redacted when dropped: a JSON line has
/// each string redacted (it stays valid JSON), any other text is redacted as text. Made
/// once per event by the logger, so a secret is never split across two writes.
pub struct RedactingWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: Write> RedactingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::new(),
        }
    }

    fn redacted(&self) -> String {
        redact_uri(&String::from_utf8_lossy(&self.buf))
    }
}

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for RedactingWriter<W> {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let out = self.redacted();
        let _ = self.inner.write_all(out.as_bytes());
        let _ = self.inner.flush();
    }
}

/// Whether an option name (any case, `_`/`-`/`.` ignored) carries a secret.
pub fn is_secret_option(name: &str) -> bool {
    let n: String = name
        .chars()
        .filter(|c| !matches!(c, '_' | '-' | '.'))
        .flat_map(char::to_lowercase)
        .collect();
    SECRET_OPTIONS.contains(&n.as_str()) || SECRET_WORDS.iter().any(|w| n.contains(w))
}

/// `Uri`: the whole input is one connection string (whitespace is part of it). `Text`: a
/// message that may contain connection strings among other words.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Uri,
    Text,
}

fn whole_mode(s: &str) -> Mode {
    if s.contains("://") {
        Mode::Uri
    } else {
        Mode::Text
    }
}

/// Byte ranges of `s` that hold secrets.
fn secret_spans(s: &str, mode: Mode) -> Vec<Range<usize>> {
    let mut spans: Vec<Range<usize>> = named_spans(s, mode).into_iter().map(|(r, _)| r).collect();
    spans.sort_by_key(|r| (r.start, r.end));
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(spans.len());
    for r in spans {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Secret ranges, each with the option it is the value of (`None`: a userinfo password).
fn named_spans(s: &str, mode: Mode) -> Vec<(Range<usize>, Option<&str>)> {
    let (passwords, userinfo) = userinfo_spans(s, mode);
    let mut spans: Vec<_> = passwords.into_iter().map(|r| (r, None)).collect();
    spans.extend(
        option_spans(s, mode, &userinfo)
            .into_iter()
            .map(|(k, r)| (r, Some(&s[k]))),
    );
    spans
}

/// Replace each span by [`MASK`].
fn apply(s: &str, spans: &[Range<usize>]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut at = 0;
    for r in spans {
        out.push_str(&s[at..r.start]);
        out.push_str(MASK);
        at = r.end;
    }
    out.push_str(&s[at..]);
    out
}

/// The password spans of every `scheme://user:password@` and the whole userinfo ranges
/// (where option names must not be looked for: a user called `token` is not an option).
fn userinfo_spans(s: &str, mode: Mode) -> (Vec<Range<usize>>, Vec<Range<usize>>) {
    let (mut spans, mut userinfo) = (Vec::new(), Vec::new());
    let mut i = 0;
    while let Some(p) = s[i..].find("://") {
        let start = i + p + 3;
        let end = match mode {
            Mode::Uri => s.len(),
            Mode::Text => token_end(s, start),
        };
        let tok = &s[start..end];
        i = end.max(start);
        if let Some(at) = tok.rfind('@') {
            // The LAST `@` of the token: a password may hold unencoded `@`, `/`, `?`, `#`.
            userinfo.push(start..start + at);
            if let Some(colon) = tok[..at].find(':') {
                spans.push(start + colon + 1..start + at);
            }
            i = start + at + 1;
        } else {
            let auth_end = tok.find(['/', '?', '#']).unwrap_or(tok.len());
            let auth = &tok[..auth_end];
            if let (Some(colon), false) = (auth.find(':'), is_host_list(auth)) {
                // `user:pass word@host` cut at the space, or a password holding `://`: hide
                // up to the next `@` on the line (the last of its word), else the whole line.
                let line_end = s[start..].find('\n').map_or(s.len(), |x| start + x);
                let hide_to = match s[end..line_end].find('@') {
                    Some(q) => {
                        let q = end + q;
                        let word_end = s[q..line_end]
                            .find(char::is_whitespace)
                            .map_or(line_end, |x| q + x);
                        q + s[q..word_end].rfind('@').unwrap_or(0)
                    }
                    None => line_end,
                };
                userinfo.push(start..hide_to);
                spans.push(start + colon + 1..hide_to);
                i = hide_to.max(start);
            }
        }
        if mode == Mode::Uri {
            break;
        }
    }
    (spans, userinfo)
}

/// End of the connection string starting at `start` in free text: the first whitespace or
/// control character. Not the next `scheme://`: a password may hold one, and two URIs run
/// together without a space do not occur in outputs (JSON is redacted value by value).
fn token_end(s: &str, start: usize) -> usize {
    s[start..]
        .find(|c: char| c.is_whitespace() || c.is_control())
        .map_or(s.len(), |x| start + x)
}

/// `h1:27017,h2`, `[::1]:5432`, `%2Ftmp%2F.s.PGSQL.5432`, or empty: no password can be here.
fn is_host_list(auth: &str) -> bool {
    // What ends a URI in a sentence or a quoted string: `at mongodb://h:27017: timeout`.
    let auth = auth.trim_end_matches(['"', '\'', '`', ')', '}', '>', ',', ';', '.', ':']);
    auth.split(',').all(|h| {
        let (name, port) = if let Some(rest) = h.strip_prefix('[') {
            match rest.find(']') {
                Some(e) => match &rest[e + 1..] {
                    "" => return true,
                    p => match p.strip_prefix(':') {
                        Some(p) => ("", p),
                        None => return false,
                    },
                },
                None => return false,
            }
        } else {
            match h.split_once(':') {
                Some((n, p)) => (n, p),
                None => (h, ""),
            }
        };
        name.chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '_' | '~' | '%'))
            && port.chars().all(|c| c.is_ascii_digit())
    })
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// Values of secret options: `?password=…&`, `password='…'`, `"password": "…"`,
/// `AWS_SESSION_TOKEN:…`. Names inside a userinfo range are skipped.
fn option_spans(
    s: &str,
    mode: Mode,
    userinfo: &[Range<usize>],
) -> Vec<(Range<usize>, Range<usize>)> {
    let mut spans = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        let starts_key = is_key_char(c) && (i == 0 || !is_key_char(b[i - 1] as char));
        if !starts_key {
            i += 1;
            continue;
        }
        let k0 = i;
        let mut k1 = i;
        while k1 < b.len() && is_key_char(b[k1] as char) {
            k1 += 1;
        }
        i = k1;
        let key = &s[k0..k1];
        if !is_secret_option(key) || userinfo.iter().any(|r| r.contains(&k0)) {
            continue;
        }
        if let Some(span) = option_value(s, mode, k0, k1) {
            i = span.end.max(k1);
            spans.push((k0..k1, span));
        }
    }
    spans
}

/// The value span of the option named `s[k0..k1]`, if a separator and a value follow.
fn option_value(s: &str, mode: Mode, k0: usize, k1: usize) -> Option<Range<usize>> {
    let b = s.as_bytes();
    let before = if k0 > 0 { b[k0 - 1] } else { b' ' };
    let mut j = k1;
    let quoted_key = matches!(before, b'"' | b'\'') && b.get(j) == Some(&before);
    if quoted_key {
        j += 1;
    }
    if mode == Mode::Text {
        while b.get(j) == Some(&b' ') {
            j += 1;
        }
    }
    let sep = *b.get(j)?;
    let key = &s[k0..k1];
    let colon_ok = mode == Mode::Text
        && (quoted_key
            || matches!(b.get(j + 1), Some(b' ' | b'"' | b'\''))
            || (key.contains('_') && !key.chars().any(|c| c.is_ascii_lowercase())));
    if !(sep == b'=' || (sep == b':' && colon_ok)) {
        return None;
    }
    j += 1;
    if mode == Mode::Text {
        while b.get(j) == Some(&b' ') {
            j += 1;
        }
    }
    let v0 = j;
    if s[v0..].starts_with(MASK) {
        return None;
    }
    let in_query = matches!(before, b'?' | b'&' | b';');
    let mut v1 = v0;
    if mode == Mode::Text && !in_query && matches!(b.get(v0), Some(b'"' | b'\'')) {
        // A quoted value (libpq conninfo, Debug, JSON text): to the closing unescaped quote.
        let q = b[v0];
        let mut k = v0 + 1;
        loop {
            match b.get(k) {
                None | Some(b'\n') => break,
                Some(b'\\') => k += 2,
                Some(&c) if c == q => {
                    k += 1;
                    break;
                }
                _ => k += 1,
            }
        }
        v1 = k.min(b.len());
    }
    // Unquoted (or what follows a closing quote): to whitespace in text, to the next
    // `&name=` (a new option), or to `,` after a `NAME:` pair.
    while v1 < b.len() {
        let c = b[v1];
        if c == b'\n' || (mode == Mode::Text && (c as char).is_ascii_whitespace()) {
            break;
        }
        if sep == b':' && c == b',' {
            break;
        }
        if c == b'&' && starts_option(&s[v1 + 1..]) {
            break;
        }
        v1 += 1;
    }
    // Never end inside a UTF-8 sequence (the loops step by bytes).
    while !s.is_char_boundary(v1) {
        v1 += 1;
    }
    (v1 > v0).then_some(v0..v1)
}

/// Whether `rest` begins with `name=` (an option after `&`).
fn starts_option(rest: &str) -> bool {
    let n = rest.find(|c: char| !is_key_char(c)).unwrap_or(rest.len());
    n > 0 && rest[n..].starts_with('=')
}

/// Remember the secrets of a connection string, so they are masked in any later output.
fn remember_secrets_of(s: &str) {
    let mut found = Vec::new();
    for (r, name) in named_spans(s, whole_mode(s)) {
        let v = &s[r];
        let mut forms = vec![v.to_string()];
        forms.push(percent_decode(v));
        forms.push(percent_decode(&v.replace('+', " ")));
        // The pieces a driver may echo alone. In `authMechanismProperties` only the values of
        // secret properties: `SERVICE_NAME:mongodb` must not mask the word "mongodb".
        let pieces: Vec<String> = if name.is_some_and(|n| {
            is_secret_option(n) && n.eq_ignore_ascii_case("authMechanismProperties")
        }) {
            forms
                .iter()
                .flat_map(|f| f.split(',').map(str::to_string).collect::<Vec<_>>())
                .filter_map(|p| match p.split_once(':') {
                    Some((k, _)) if PUBLIC_AUTH_PROPERTIES.contains(&k) => None,
                    Some((k, v)) if k.eq_ignore_ascii_case("AWS_SESSION_TOKEN") => {
                        Some(v.to_string())
                    }
                    _ => Some(p),
                })
                .collect()
        } else {
            forms.clone()
        };
        for f in pieces {
            forms.extend(
                f.split(|c: char| c.is_whitespace() || ":/?#[]@,;&=\"'".contains(c))
                    .map(str::to_string),
            );
            forms.push(f);
        }
        for f in forms {
            found.push(escaped(&f, true));
            found.push(escaped(&f, false));
            found.push(f);
        }
    }
    remember(found);
}

/// `authMechanismProperties` entries that name things rather than prove identity.
const PUBLIC_AUTH_PROPERTIES: &[&str] = &[
    "SERVICE_NAME",
    "SERVICE_REALM",
    "SERVICE_HOST",
    "CANONICALIZE_HOST_NAME",
    "ENVIRONMENT",
];

/// `f` as it appears inside a JSON string (`json`) or a Rust `{:?}` string.
fn escaped(f: &str, json: bool) -> String {
    let q = if json {
        serde_json::to_string(f).unwrap_or_default()
    } else {
        format!("{f:?}")
    };
    q.get(1..q.len().saturating_sub(1))
        .unwrap_or_default()
        .to_string()
}

fn percent_decode(v: &str) -> String {
    percent_encoding::percent_decode_str(v)
        .decode_utf8_lossy()
        .into_owned()
}

/// Add values to mask in every later output (kept for the life of the process).
pub fn remember(values: impl IntoIterator<Item = String>) {
    let Ok(mut known) = KNOWN.write() else {
        return;
    };
    for v in values {
        if v.chars().count() >= MIN_KNOWN_LEN && !known.contains(&v) {
            known.push(v);
        }
    }
    known.sort_by_key(|v| std::cmp::Reverse(v.len()));
}

/// Mask every remembered secret in `text`.
fn scrub_known(text: &str) -> String {
    let Ok(known) = KNOWN.read() else {
        return text.to_string();
    };
    let mut out: Option<String> = None;
    for k in known.iter() {
        let cur = out.as_deref().unwrap_or(text);
        if cur.contains(k.as_str()) {
            out = Some(cur.replace(k.as_str(), MASK));
        }
    }
    out.unwrap_or_else(|| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_in_mongodb_seed_list() {
        let s = redact_patterns("mongodb://admin:hunter2@h1:27017,h2:27017/db?authSource=admin");
        assert_eq!(
            s,
            "mongodb://admin:***@h1:27017,h2:27017/db?authSource=admin"
        );
    }

    #[test]
    fn redacts_password_query_parameter_and_keeps_plain_uris() {
        assert_eq!(
            redact_patterns("postgres://u@h/db?password=hunter2&sslmode=require"),
            "postgres://u@h/db?password=***&sslmode=require"
        );
        assert_eq!(
            redact_patterns("sqlite://state/x.db"),
            "sqlite://state/x.db"
        );
        assert_eq!(
            redact_patterns("mongodb://h1:27017,[::1]:27018/?replicaSet=rs0 failed"),
            "mongodb://h1:27017,[::1]:27018/?replicaSet=rs0 failed"
        );
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = SecretUri::new("postgres://root:s3cr3t@localhost/db");
        assert!(!format!("{s:?} {s}").contains("s3cr3t"));
    }

    /// The two forms the security review found leaking (issue 29).
    #[test]
    fn unencoded_reserved_characters_and_aws_session_token_are_hidden() {
        assert_eq!(
            redact_patterns("postgres://user:p@ss/w0rd@host/db"),
            "postgres://user:***@host/db"
        );
        assert_eq!(
            redact_patterns("cannot open postgres://u:a?b#c:d@db.internal:5432/v3: refused"),
            "cannot open postgres://u:***@db.internal:5432/v3: refused"
        );
        assert_eq!(
            redact_patterns(
                "mongodb://AKIA:sk@h/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:FQoG%2Bz&tls=true"
            ),
            "mongodb://AKIA:***@h/?authMechanism=MONGODB-AWS&authMechanismProperties=***&tls=true"
        );
        assert_eq!(
            redact_patterns("got AWS_SESSION_TOKEN:FQoGZXIvYXdzE, SERVICE_NAME:x"),
            "got AWS_SESSION_TOKEN:***, SERVICE_NAME:x"
        );
    }

    #[test]
    fn every_listed_option_and_libpq_conninfo_values_are_hidden() {
        for name in [
            "authMechanismProperties",
            "tlsCertificateKeyFilePassword",
            "sslClientCertificateKeyPassword",
            "sslPEMKeyPassword",
            "proxyPassword",
            "password",
            "sslpassword",
            "oauth_client_secret",
            "AWS_SESSION_TOKEN",
            "aws_secret_access_key",
        ] {
            let uri = format!("postgres://h/db?sslmode=require&{name}=Zx9-secret&port=5");
            assert_eq!(
                redact_patterns(&uri),
                format!("postgres://h/db?sslmode=require&{name}=***&port=5"),
                "{name}"
            );
        }
        assert_eq!(
            redact_patterns("host=db.internal password='it\\'s a secret' dbname=v3"),
            "host=db.internal password=*** dbname=v3"
        );
        assert_eq!(
            redact_patterns(r#"Opts { password: "Zx9 q", host: "h" }"#),
            r#"Opts { password: ***, host: "h" }"#
        );
    }

    #[test]
    fn a_space_in_a_password_hides_up_to_the_host() {
        assert_eq!(
            redact_patterns("connect postgres://u:my pass@h/db failed"),
            "connect postgres://u:***@h/db failed"
        );
        assert_eq!(
            SecretUri::new("postgres://u:m7 Pz9 Wq4@h/db").redacted(),
            "postgres://u:***@h/db"
        );
    }

    #[test]
    fn remembered_values_are_masked_wherever_they_appear() {
        let _ = SecretUri::new("mongodb://u:Kq7vW2%40pz?t4il@h/?proxyPassword=Pr0xyPw9");
        // The decoded form, a piece a driver echoes as a "port", an option value alone.
        let text = "password Kq7vW2@pz; got Kq7vW2%40pz; value=Pr0xyPw9";
        let out = redact_uri(text);
        for leak in ["Kq7vW2", "Pr0xyPw9"] {
            assert!(!out.contains(leak), "{out}");
        }
    }

    /// A report: the span of a password never runs into the next values.
    #[test]
    fn json_documents_are_redacted_value_by_value() {
        let report = serde_json::json!({
            "error": "cannot open postgres://u:Wq9xZ1@db.internal/v3",
            "warnings": ["record a@b.example deferred"],
        });
        let text = serde_json::to_string_pretty(&report).unwrap();
        let out = redact_uri(&text);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["error"], "cannot open postgres://u:***@db.internal/v3");
        assert_eq!(v["warnings"][0], "record a@b.example deferred");
        assert!(out.contains("\n  \"warnings\""), "stays pretty: {out}");
    }

    #[test]
    fn json_log_lines_stay_json() {
        let _ = SecretUri::new("postgres://u@h/db?sslpassword=Jx4kQ9zz");
        let mut w = RedactingWriter::new(Vec::new());
        w.write_all(br#"{"key":"sslpassword","value":"Jx4kQ9zz","msg":"ignoring"}"#)
            .unwrap();
        w.write_all(b"\n").unwrap();
        let out = w.redacted();
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v["value"], "***");
        assert!(out.ends_with('\n'));
    }
}

/// Property tests: random connection strings with credentials in every position, random
/// characters in them, embedded in messages, JSON and `Debug` text.
#[cfg(test)]
pub(crate) mod props {
    use super::*;
    use proptest::prelude::*;

    /// A generated connection string and what must and must not show after redaction.
    #[derive(Debug, Clone)]
    pub struct Case {
        pub uri: String,
        /// Every word of every secret: none may appear in an output.
        pub secret_words: Vec<String>,
        /// The first host: it must stay readable.
        pub host: String,
    }

    /// A secret's word: never an ordinary word of an output (`Q`, letters, a digit).
    fn word() -> impl Strategy<Value = String> {
        "Q[A-Z]{2}[0-9][A-Z0-9]{2,5}"
    }

    /// Characters that appear between the words of a password: every reserved character,
    /// quotes, backslash, percent-escapes and non-ASCII; whitespace only when `spaces`.
    fn password_sep(spaces: bool) -> impl Strategy<Value = String> {
        let mut seps: Vec<&'static str> = vec![
            "@", "/", ":", "?", "#", "[", "]", "&", "=", "%", "+", ",", ";", "\"", "'", "\\", "!",
            "$", "*", "(", ")", "~", "é", "漢", "%40", "%2F", "%3A", "://", "@@", "-", "_", ".",
            "",
        ];
        if spaces {
            seps.extend([" ", "  ", "\t"]);
        }
        proptest::sample::select(seps).prop_map(str::to_string)
    }

    /// Characters inside an option's value (a raw `&` or `@` would end the option or the
    /// host part, so drivers require them encoded).
    fn option_sep() -> impl Strategy<Value = String> {
        proptest::sample::select(vec![
            ":", ",", "/", "+", "=", "?", "#", "%", "!", "*", "(", ")", "~", "$", "%26", "%40",
            "%2B", "-", "_", ".",
        ])
        .prop_map(str::to_string)
    }

    fn joined(
        sep: BoxedStrategy<String>,
        n: usize,
    ) -> impl Strategy<Value = (String, Vec<String>)> {
        (sep.clone(), proptest::collection::vec((word(), sep), 1..=n)).prop_map(|(lead, parts)| {
            let mut s = lead;
            let mut words = Vec::new();
            for (w, sep) in parts {
                s.push_str(&w);
                s.push_str(&sep);
                words.push(w);
            }
            (s, words)
        })
    }

    fn host() -> impl Strategy<Value = String> {
        prop_oneof![
            (
                "[a-z][a-z0-9-]{2,8}\\.(internal|example\\.net|corp)",
                proptest::option::of(1u16..65535)
            )
                .prop_map(|(h, p)| match p {
                    Some(p) => format!("{h}:{p}"),
                    None => h,
                }),
            (1u8..250, 1u8..250).prop_map(|(a, b)| format!("10.{a}.{b}.7:5432")),
            Just("[fd00::17]:27017".to_string()),
        ]
    }

    /// Option names as the drivers spell them, with their kind of value.
    const SECRET_NAMES: &[&str] = &[
        "authMechanismProperties",
        "tlsCertificateKeyFilePassword",
        "sslClientCertificateKeyPassword",
        "sslPEMKeyPassword",
        "proxyPassword",
        "password",
        "sslpassword",
        "oauth_client_secret",
        "AWS_SESSION_TOKEN",
        "aws_secret_access_key",
    ];
    const PLAIN_OPTIONS: &[&str] = &[
        "authSource=admin",
        "replicaSet=rs0",
        "sslmode=verify-full",
        "tls=true",
        "appName=tidemark",
        "connectTimeoutMS=1500",
        "authMechanism=MONGODB-AWS",
        "sslrootcert=/etc/tidemark/ca.pem",
    ];

    fn option() -> impl Strategy<Value = (String, Vec<String>)> {
        prop_oneof![
            (
                proptest::sample::select(SECRET_NAMES),
                joined(option_sep().boxed(), 3)
            )
                .prop_map(|(name, (v, words))| {
                    let v = if name == "authMechanismProperties" {
                        format!("SERVICE_NAME:mongodb,AWS_SESSION_TOKEN:{v}")
                    } else {
                        v
                    };
                    (format!("{name}={v}"), words)
                }),
            proptest::sample::select(PLAIN_OPTIONS).prop_map(|o| (o.to_string(), Vec::new())),
        ]
    }

    /// A connection string with a password (raw or percent-encoded) in the userinfo and
    /// secrets in any of the listed options.
    pub fn case(spaces: bool) -> impl Strategy<Value = Case> {
        (
            proptest::sample::select(vec!["mongodb", "mongodb+srv", "postgres", "postgresql"]),
            "[a-z][a-z0-9._-]{0,8}|",
            proptest::option::weighted(0.85, joined(password_sep(spaces).boxed(), 4)),
            any::<bool>(),
            proptest::collection::vec(host(), 1..=3),
            proptest::sample::select(vec!["", "/", "/v3", "/db_x"]),
            proptest::collection::vec(option(), 0..=4),
        )
            .prop_map(|(scheme, user, pw, encode, hosts, path, opts)| {
                let mut secret_words = Vec::new();
                let userinfo = match pw {
                    Some((pw, words)) => {
                        secret_words.extend(words);
                        let pw = if encode {
                            percent_encoding::utf8_percent_encode(
                                &pw,
                                percent_encoding::NON_ALPHANUMERIC,
                            )
                            .to_string()
                        } else {
                            pw
                        };
                        format!("{user}:{pw}@")
                    }
                    None if user.is_empty() => String::new(),
                    None => format!("{user}@"),
                };
                let hosts = if scheme == "mongodb+srv" {
                    vec![hosts[0].split(':').next().unwrap_or("h").to_string()]
                } else {
                    hosts
                };
                let mut query = String::new();
                for (i, (o, words)) in opts.into_iter().enumerate() {
                    query.push(if i == 0 { '?' } else { '&' });
                    query.push_str(&o);
                    secret_words.extend(words);
                }
                let path = if !query.is_empty() && path.is_empty() {
                    "/"
                } else {
                    path
                };
                let host = hosts[0]
                    .rsplit_once(':')
                    .filter(|(h, _)| !h.ends_with(':'))
                    .map_or(hosts[0].clone(), |(h, _)| h.to_string());
                Case {
                    uri: format!("{scheme}://{userinfo}{}{path}{query}", hosts.join(",")),
                    secret_words,
                    host,
                }
            })
    }

    /// The URI as it can appear in an output: alone, in a message, JSON-escaped, `Debug`.
    fn contexts(uri: &str) -> Vec<String> {
        vec![
            uri.to_string(),
            format!("cannot open the target {uri} (target.url): connection refused"),
            format!(
                "{{\"level\":\"ERROR\",\"error\":{}}}",
                serde_json::to_string(uri).unwrap()
            ),
            format!("Settings {{ uri: {uri:?}, database: \"legacy\" }}"),
            format!("{uri}\n{uri}"),
        ]
    }

    fn assert_clean(case: &Case, what: &str, out: &str) -> Result<(), TestCaseError> {
        for w in &case.secret_words {
            prop_assert!(
                !out.contains(w.as_str()),
                "{what}: {w} leaks in {out:?} (uri {:?})",
                case.uri
            );
        }
        prop_assert!(
            out.contains(case.host.as_str()),
            "{what}: host {} hidden in {out:?}",
            case.host
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Layer 1 alone, on the whole connection string (whitespace inside a password too).
        #[test]
        fn patterns_hide_every_secret_of_a_whole_uri(case in case(true)) {
            let out = apply(&case.uri, &secret_spans(&case.uri, whole_mode(&case.uri)));
            assert_clean(&case, "whole uri", &out)?;
        }

        /// Layer 1 alone, on free text holding the URI (no whitespace inside passwords:
        /// there the words after a space are layer 2's, see the next test).
        #[test]
        fn patterns_hide_every_secret_in_free_text(case in case(false)) {
            for text in contexts(&case.uri) {
                assert_clean(&case, &text, &redact_patterns(&text))?;
            }
        }

    }

    proptest! {
        // Fewer cases: each remembers its secrets for the rest of the process.
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Both layers, as every output path uses them: after a `SecretUri` was built,
        /// its secrets are hidden in any text holding the URI or a part of it.
        #[test]
        fn redaction_hides_every_secret_whatever_the_form(case in case(true)) {
            let s = SecretUri::new(case.uri.clone());
            assert_clean(&case, "Display", &s.to_string())?;
            assert_clean(&case, "Debug", &format!("{s:?}"))?;
            for text in contexts(&case.uri) {
                assert_clean(&case, &text, &redact_uri(&text))?;
            }
            let decoded = percent_decode(&case.uri);
            // Decoding may put an `@` after the host, which then hides the host too.
            let out = redact_uri(&format!("password {decoded} rejected"));
            for w in &case.secret_words {
                prop_assert!(!out.contains(w.as_str()), "decoded: {w} leaks in {out:?}");
            }
            let mut json = serde_json::json!({ "error": case.uri, "nested": [case.uri] });
            redact_json(&mut json);
            assert_clean(&case, "json", &json.to_string())?;
        }
    }
}
