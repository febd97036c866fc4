//! The target's side of `check-config --connect`: can tidemark create and write tables there,
//! and is it migrated. Changes nothing: a SQLite file that does not exist is not created, and
//! the table written on an existing target is created inside a transaction that is rolled back.

use super::{with_pool, BeginWrite, Sink};
use crate::reach::{Cause, Side, Unreachable};
use crate::secret::SecretUri;
use std::path::{Path, PathBuf};

/// The file of a `sqlite:` URL (`None`: not SQLite, or in memory).
pub fn sqlite_file(url: &SecretUri) -> Option<PathBuf> {
    let raw = url.expose();
    let rest = raw
        .strip_prefix("sqlite://")
        .or_else(|| raw.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && !path.starts_with(":memory:")).then(|| PathBuf::from(path))
}

/// A SQLite file that does not exist yet can be created: the nearest folder of its path that
/// exists is writable (a probe file is created in it and removed). `Ok` names that folder.
pub fn sqlite_creatable(url: &SecretUri, file: &Path) -> Result<PathBuf, Unreachable> {
    let absolute = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let mut dir = absolute.parent().map(Path::to_path_buf).unwrap_or_default();
    while !dir.exists() {
        match dir.parent() {
            Some(p) => dir = p.to_path_buf(),
            None => break,
        }
    }
    tempfile::NamedTempFile::new_in(&dir)
        .map(|_| dir.clone())
        .map_err(|e| {
            let detail = format!("{}: {e}", dir.display());
            Unreachable::new(Side::Target, Cause::FileUnusable, url, &detail).said(&detail)
        })
}

impl Sink {
    /// Create a table, write a row into it, and roll both back: the rights `migrate` and
    /// `run` need (CREATE on the schema, INSERT), or the error that says which is missing.
    pub async fn check_writable(&self, url: &SecretUri) -> Result<(), Unreachable> {
        let table = format!("tidemark_check_{}", std::process::id());
        let create = format!("CREATE TABLE {table} (id INTEGER PRIMARY KEY)");
        let insert = format!("INSERT INTO {table} (id) VALUES (1)");
        let result: sqlx::Result<()> = with_pool!(self, p => async {
            let mut tx = p.begin_write().await?;
            sqlx::query(&create).execute(&mut *tx).await?;
            sqlx::query(&insert).execute(&mut *tx).await?;
            tx.rollback().await
        }
        .await);
        result.map_err(|e| super::reach::unreachable(url, &e))
    }
}
