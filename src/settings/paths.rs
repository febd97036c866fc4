//! Where the relative paths of the settings point: a path written in a settings file is
//! relative to that file's folder; one from an environment variable, a command-line flag
//! or the built-in defaults is relative to the current directory. The SQLite default
//! target (an empty `target.url`) lives in `state_dir`. README.md, "Paths", says the same.

use super::Settings;
use crate::secret::SecretUri;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Options of a connection string that name a file: MongoDB's TLS files and libpq's.
const FILE_OPTIONS: &[&str] = &[
    "tlscafile",
    "tlscertificatekeyfile",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
];

/// `config`'s origin of a value read from `TIDEMARK__*` variables.
const FROM_ENVIRONMENT: &str = "the environment";

/// Which of the path-holding keys the settings file set (and no variable overrode).
#[derive(Debug, Default)]
pub(super) struct FromFile {
    /// The settings file's folder, absolute.
    dir: PathBuf,
    state_dir: bool,
    reports_dir: bool,
    mapping: bool,
    source_uri: bool,
    target_url: bool,
}

impl FromFile {
    /// Read the origins of the path-holding keys from the layered configuration. `file`:
    /// the `--config` file (`None`: nothing comes from a file).
    pub(super) fn of(cfg: &config::Config, file: Option<&Path>) -> Result<Self> {
        let Some(file) = file else {
            return Ok(Self::default());
        };
        let abs = std::path::absolute(file)
            .with_context(|| format!("cannot resolve the folder of {}", file.display()))?;
        let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
        // `Config::get` would deserialize the value and lose its origin: read the tables.
        let in_file = |key: &str| {
            let (table, name) = match key.split_once('.') {
                Some((section, name)) => (cfg.get_table(section).ok(), name),
                None => (cfg.cache.clone().into_table().ok(), key),
            };
            table
                .and_then(|t| t.get(name).and_then(|v| v.origin().map(str::to_owned)))
                .is_some_and(|o| o != FROM_ENVIRONMENT)
        };
        Ok(Self {
            state_dir: in_file("state_dir"),
            reports_dir: in_file("reports_dir"),
            mapping: in_file("sync.mapping"),
            source_uri: in_file("source.uri"),
            target_url: in_file("target.url"),
            dir,
        })
    }

    fn join(&self, set: bool, p: &Path) -> PathBuf {
        if set && p.is_relative() && !p.as_os_str().is_empty() {
            self.dir.join(p)
        } else {
            p.to_path_buf()
        }
    }
}

/// Resolve the settings' paths (see the module comment); the default SQLite target goes
/// into `state_dir`.
pub(super) fn resolve(s: &mut Settings, from: &FromFile) {
    s.state_dir = from.join(from.state_dir, &s.state_dir);
    s.reports_dir = from.join(from.reports_dir, &s.reports_dir);
    s.sync.mapping = from.join(from.mapping, &s.sync.mapping);
    if from.source_uri {
        let uri = with_absolute_files(s.source.uri.expose(), &from.dir);
        s.source.uri = SecretUri::new(uri);
    }
    if s.target.url.expose().trim().is_empty() {
        let db = s.state_dir.join("tidemark.db");
        s.target.url = SecretUri::new(format!("sqlite://{}", db.display()));
    } else if from.target_url {
        let mut url = with_absolute_files(s.target.url.expose(), &from.dir);
        if let Some(abs) = sqlite_absolute(&url, &from.dir) {
            url = abs;
        }
        s.target.url = SecretUri::new(url);
    }
}

/// `sqlite://REL[?…]` or `sqlite:REL` made `sqlite:///DIR/REL`; `None` when absolute,
/// in memory, or not SQLite.
fn sqlite_absolute(url: &str, dir: &Path) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if path.is_empty() || path.starts_with('/') || path.starts_with(":memory:") {
        return None;
    }
    let abs = dir.join(path);
    Some(match query {
        Some(q) => format!("sqlite://{}?{q}", abs.display()),
        None => format!("sqlite://{}", abs.display()),
    })
}

/// The connection string with every relative file option ([`FILE_OPTIONS`]) made absolute
/// against `dir`. Other options, and the credentials, are left byte for byte.
fn with_absolute_files(uri: &str, dir: &Path) -> String {
    let Some((head, query)) = uri.split_once('?') else {
        return uri.to_string();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let options: Vec<String> = query
        .split('&')
        .map(|opt| {
            let Some((key, value)) = opt.split_once('=') else {
                return opt.to_string();
            };
            let decoded = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
            let path = Path::new(decoded.as_ref());
            if !FILE_OPTIONS.contains(&key.to_ascii_lowercase().as_str())
                || !path.is_relative()
                || decoded.is_empty()
            {
                return opt.to_string();
            }
            let abs = dir.join(path);
            let encoded = percent_encoding::utf8_percent_encode(
                &abs.to_string_lossy(),
                percent_encoding::NON_ALPHANUMERIC,
            )
            .to_string()
            .replace("%2F", "/")
            .replace("%2E", ".")
            .replace("%2D", "-")
            .replace("%5F", "_");
            format!("{key}={encoded}")
        })
        .collect();
    let mut out = format!("{head}?{}", options.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_options_become_absolute_and_the_rest_stays() {
        let dir = Path::new("/etc/tidemark");
        let uri = "mongodb://u:p%40ss@h:27017/?tls=true&tlsCAFile=certs/ca.pem&tlsCertificateKeyFile=/abs/k.pem";
        assert_eq!(
            with_absolute_files(uri, dir),
            "mongodb://u:p%40ss@h:27017/?tls=true&tlsCAFile=/etc/tidemark/certs/ca.pem&tlsCertificateKeyFile=/abs/k.pem"
        );
        let pg = "postgres://u@h/db?sslmode=verify-full&sslrootcert=my%20ca.pem";
        assert_eq!(
            with_absolute_files(pg, dir),
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/etc/tidemark/my%20ca.pem"
        );
        assert_eq!(
            with_absolute_files("postgres://u@h/db", dir),
            "postgres://u@h/db"
        );
    }

    #[test]
    fn sqlite_paths() {
        let dir = Path::new("/srv/t");
        assert_eq!(
            sqlite_absolute("sqlite://data/x.db?mode=rwc", dir).as_deref(),
            Some("sqlite:///srv/t/data/x.db?mode=rwc")
        );
        assert_eq!(
            sqlite_absolute("sqlite:x.db", dir).as_deref(),
            Some("sqlite:///srv/t/x.db")
        );
        assert_eq!(sqlite_absolute("sqlite:///abs/x.db", dir), None);
        assert_eq!(sqlite_absolute("sqlite::memory:", dir), None);
        assert_eq!(sqlite_absolute("postgres://h/db", dir), None);
    }
}
