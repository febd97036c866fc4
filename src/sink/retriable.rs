//! Which target errors are worth another attempt: the one place that decides it for the
//! target (the source's is `source::mongo::is_retriable_error`), used with the policies of
//! [`crate::retry`].

/// Whether a target error is worth retrying: the connection dropped, timed out or could not
/// be had; the server is shutting down or out of connections; a serialization failure, a
/// deadlock or a lock timeout; SQLite busy or locked; or two processes created the same
/// table or index at once (a duplicate key in one of PostgreSQL's catalogs, `pg_…`).
pub fn is_retriable_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| match c.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut) => true,
        Some(sqlx::Error::Database(d)) => {
            let code = d.code().unwrap_or_default();
            let catalog_race =
                code == "23505" && d.constraint().is_some_and(|c| c.starts_with("pg_"));
            catalog_race
                || code.starts_with("08")
                || [
                    // PostgreSQL: serialization failure, deadlock, lock not available, admin
                    // or crash shutdown, cannot connect now, too many connections, duplicate
                    // table or object (CREATE … IF NOT EXISTS racing another process).
                    "40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300", "42P07",
                    "42710", // SQLite (extended codes): BUSY, LOCKED, BUSY_RECOVERY,
                    // LOCKED_SHAREDCACHE, BUSY_SNAPSHOT.
                    "5", "6", "261", "262", "517",
                ]
                .contains(&&*code)
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn dropped_connections_are_retried_and_logic_errors_are_not() {
        let io: anyhow::Result<()> = Err(sqlx::Error::Io(std::io::Error::other("reset")).into());
        assert!(is_retriable_error(
            &io.context("writing a batch").unwrap_err()
        ));
        let missing: anyhow::Error = sqlx::Error::RowNotFound.into();
        assert!(!is_retriable_error(&missing));
        assert!(!is_retriable_error(&anyhow::anyhow!("a mapping error")));
    }
}
