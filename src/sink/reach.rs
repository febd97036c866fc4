//! sqlx's connection errors sorted into [`Cause`]s (the words are in `crate::reach`), and the
//! first PostgreSQL connection opened alone, with a timeout, so a refused port or a refused
//! password is reported at once and by name, not after the pool's acquire timeout as "pool
//! timed out while waiting for an open connection".

use crate::reach::{io_cause, is_dns_text, is_tls_text, Cause, Side, Unreachable};
use crate::secret::{redact_uri, SecretUri};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection;
use std::time::Duration;
use tracing::debug;

/// How long opening one target connection may take (and the pool's acquire timeout).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// PostgreSQL SQLSTATEs met while connecting or checking rights.
const INVALID_PASSWORD: &str = "28P01";
const INVALID_AUTHORIZATION: &str = "28000";
const INVALID_CATALOG_NAME: &str = "3D000";
const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// SQLite result codes: SQLITE_CANTOPEN, SQLITE_READONLY, SQLITE_PERM.
const SQLITE_FILE_CODES: &[&str] = &["14", "8", "3"];

/// Sort a driver error; the second value is the server's own short message when it adds to
/// the cause (`role "x" does not exist`).
pub fn cause(e: &sqlx::Error, database: Option<&str>) -> (Cause, Option<String>) {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let said = Some(db.message().to_string());
            match code.as_str() {
                INVALID_PASSWORD | INVALID_AUTHORIZATION => (Cause::AuthFailed, said),
                INVALID_CATALOG_NAME => (
                    Cause::DatabaseMissing(database.unwrap_or("?").to_string()),
                    None,
                ),
                INSUFFICIENT_PRIVILEGE => (Cause::NotAuthorized, said),
                c if SQLITE_FILE_CODES.contains(&c) => (Cause::FileUnusable, said),
                _ => (Cause::Other, None),
            }
        }
        sqlx::Error::Io(io) => match io_cause(io, CONNECT_TIMEOUT) {
            // rustls' short reason (UnknownIssuer, NotValidForName) tells which fix applies.
            Cause::Tls => (Cause::Tls, Some(io.to_string())),
            cause => (cause, None),
        },
        sqlx::Error::Tls(t) => (Cause::Tls, Some(t.to_string())),
        sqlx::Error::PoolTimedOut => (Cause::TimedOut(CONNECT_TIMEOUT), None),
        other => {
            let text = other.to_string();
            let cause = if text.contains("Connection refused") {
                Cause::Refused
            } else if is_tls_text(&text) {
                Cause::Tls
            } else if is_dns_text(&text) {
                Cause::HostUnknown
            } else {
                Cause::Other
            };
            (cause, None)
        }
    }
}

/// The operator's error for a failed connection to `url`; the driver's text goes to the debug log.
pub fn unreachable(url: &SecretUri, e: &sqlx::Error) -> Unreachable {
    let detail = redact_uri(&e.to_string());
    debug!(error = %detail, "target connection failed");
    let database = database_of(url);
    let (cause, said) = cause(e, database.as_deref());
    let u = Unreachable::new(Side::Target, cause, url, &detail);
    match said {
        Some(s) => u.said(&s),
        None => u,
    }
}

/// The database named in a PostgreSQL URL.
pub fn database_of(url: &SecretUri) -> Option<String> {
    url.expose()
        .parse::<PgConnectOptions>()
        .ok()
        .and_then(|o| o.get_database().map(str::to_owned))
}

/// Open one PostgreSQL connection alone and close it: a refused port, a password or a
/// database the server refuses come back at once and by name.
pub async fn probe_postgres(url: &SecretUri, opts: &PgConnectOptions) -> Result<(), Unreachable> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(opts)).await {
        Err(_) => Err(Unreachable::new(
            Side::Target,
            Cause::TimedOut(CONNECT_TIMEOUT),
            url,
            "",
        )),
        Ok(Err(e)) => Err(unreachable(url, &e)),
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
    }
}
