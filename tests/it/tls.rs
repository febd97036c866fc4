//! TLS end to end, against real servers.
//!
//! PostgreSQL: the machine's server must have `ssl = on` with a certificate for `localhost`
//! (Debian's snakeoil pair; `TIDEMARK_TEST_PG_SSLROOTCERT` names another CA file). A run with
//! `sslmode=verify-full` lands its rows, and the server itself reports tidemark's connections
//! as TLS; a wrong host name or a wrong CA fails before anything is written, without showing
//! the password.
//!
//! MongoDB: a private `secantusd-rs` serving TLS (`--tls-cert-file` / `--tls-key-file`) with a
//! throwaway CA and a `localhost` certificate made at test time. A run with
//! `tls=true&tlsCAFile=…` lands its rows; an unknown CA, a wrong host name and a plaintext
//! client all fail with an error that names the source and hides the password.

use crate::fault_util::Mongod;
use crate::harness::{items_mapping, pg_admin_url, scalar_i64, Backend, Env};
use crate::ops_util::{items, seed, tidemark};
use sqlx::Connection;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tidemark::secret::SecretUri;

const PW: &str = "Tls-s3cret-51c0";

fn pg_root_cert() -> String {
    std::env::var("TIDEMARK_TEST_PG_SSLROOTCERT")
        .unwrap_or_else(|_| "/etc/ssl/certs/ssl-cert-snakeoil.pem".into())
}

/// Fail (never skip) when the server cannot do TLS, and say how to turn it on.
async fn require_pg_ssl() {
    let admin = pg_admin_url();
    let mut c = sqlx::PgConnection::connect(&admin)
        .await
        .expect("postgres reachable at TIDEMARK_TEST_PG_URL");
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(
        ssl, "on",
        "PostgreSQL reports ssl = {ssl}, so TLS cannot be tested. Enable it: give the server a \
         certificate for localhost (Debian: `apt-get install ssl-cert` makes the snakeoil pair), \
         then as a superuser: ALTER SYSTEM SET ssl = on; ALTER SYSTEM SET ssl_cert_file = \
         '/etc/ssl/certs/ssl-cert-snakeoil.pem'; ALTER SYSTEM SET ssl_key_file = \
         '/etc/ssl/private/ssl-cert-snakeoil.key'; SELECT pg_reload_conf();"
    );
    let root = pg_root_cert();
    assert!(
        Path::new(&root).exists(),
        "the CA file {root} for the server certificate is missing (set TIDEMARK_TEST_PG_SSLROOTCERT)"
    );
}

/// `url` (postgres://[user[:pw]@]host[:port]/db) with another host, an optional password and
/// a query string.
fn pg_url(url: &str, host: &str, password: Option<&str>, query: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let path = path.split('?').next().unwrap();
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (u.split(':').next().unwrap().to_owned(), h),
        None => ("postgres".to_owned(), authority),
    };
    let port = hostport
        .rsplit_once(':')
        .map(|(_, p)| p.to_owned())
        .unwrap_or_else(|| "5432".into());
    let userinfo = match password {
        Some(pw) => format!("{user}:{pw}"),
        None => user,
    };
    format!("{scheme}://{userinfo}@{host}:{port}/{path}?{query}")
}

/// `(ssl, version)` of one connection made with `url`, as the server sees it.
async fn pg_ssl_of(url: &str) -> (bool, Option<String>) {
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut c)
        .await
        .unwrap()
}

/// A run with `sslmode=verify-full` on `localhost` lands every row, and the server lists each
/// of tidemark's own connections to the target database as TLS.
#[tokio::test]
async fn postgres_verify_full_run_lands_rows_over_tls() {
    // Arrange
    require_pg_ssl().await;
    let env = Env::new("pgtls", Backend::Postgres, &items_mapping("epoch_millis")).await;
    let base = chrono::Utc::now().timestamp_millis() - 3 * 86_400_000;
    seed(&env, items(2_000, base, 10)).await;
    let tls = pg_url(
        &env.target_url,
        "localhost",
        None,
        &format!("sslmode=verify-full&sslrootcert={}", pg_root_cert()),
    );
    let mut s = env.settings();
    s.target.url = SecretUri::new(tls.clone());
    s.source.rate_limit = 2_000; // about a second: long enough to watch its connections
    s.source.batch_size = 100;

    // Act: run, and meanwhile list the target database's backends from another connection.
    let db = env.name.clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let run = async move {
        let r = env.run(s).await;
        d.store(true, std::sync::atomic::Ordering::SeqCst);
        (env, r)
    };
    let watch = async move {
        let mut admin = sqlx::PgConnection::connect(&pg_admin_url()).await.unwrap();
        let mut seen: Vec<(i32, bool)> = Vec::new();
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let rows: Vec<(i32, bool)> = sqlx::query_as(
                "SELECT a.pid, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
            )
            .bind(&db)
            .fetch_all(&mut admin)
            .await
            .unwrap();
            for r in rows {
                if !seen.contains(&r) {
                    seen.push(r);
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        seen
    };
    let ((env, report), seen) = tokio::join!(run, watch);
    let report = report.expect("a verify-full run works");
    let (ssl, version) = pg_ssl_of(&tls).await;
    let (plain_ssl, _) = pg_ssl_of(&pg_url(
        &env.target_url,
        "localhost",
        None,
        "sslmode=disable",
    ))
    .await;

    // Assert
    assert_eq!(report.totals.read, 2_000, "{report}");
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        2_000
    );
    assert!(
        !seen.is_empty(),
        "no tidemark connection to {} was seen during the run",
        env.name
    );
    assert!(
        seen.iter().all(|(_, ssl)| *ssl),
        "tidemark connections without TLS: {seen:?}"
    );
    assert!(ssl, "a connection with the run's URL is not TLS");
    assert!(!plain_ssl, "the check cannot tell TLS from plaintext");
    eprintln!(
        "tidemark's connections seen during the run: {} (all TLS); protocol {}",
        seen.len(),
        version.unwrap_or_default()
    );
}

/// Tables of the target database (tidemark's and mapped ones).
async fn pg_tables(plain_url: &str) -> i64 {
    scalar_i64(
        plain_url,
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .await
}

/// `sslmode=verify-full` with a name the certificate does not carry (127.0.0.1), or with a CA
/// that did not sign it, fails before any write; the error names the target and the
/// certificate problem, and never shows the password.
#[tokio::test]
async fn postgres_verify_full_refuses_wrong_host_or_ca_before_any_write() {
    // Arrange
    require_pg_ssl().await;
    let env = Env::new(
        "pgtlsbad",
        Backend::Postgres,
        &items_mapping("epoch_millis"),
    )
    .await;
    let base = chrono::Utc::now().timestamp_millis() - 3 * 86_400_000;
    seed(&env, items(100, base, 10)).await;
    let certs = tempfile::tempdir().unwrap();
    let other_ca = Pki::new(certs.path()).ca;
    let cases = [
        (
            "host name 127.0.0.1 not in the certificate",
            pg_url(
                &env.target_url,
                "127.0.0.1",
                Some(PW),
                &format!("sslmode=verify-full&sslrootcert={}", pg_root_cert()),
            ),
        ),
        (
            "a CA that did not sign the server certificate",
            pg_url(
                &env.target_url,
                "localhost",
                Some(PW),
                &format!("sslmode=verify-full&sslrootcert={}", other_ca.display()),
            ),
        ),
    ];

    for (what, url) in &cases {
        // Act
        let mut s = env.settings();
        s.target.url = SecretUri::new(url.clone());
        let started = Instant::now();
        let err = env
            .run(s)
            .await
            .expect_err(&format!("verify-full must refuse {what}"));
        let took = started.elapsed();
        let msg = format!("{err:#}");
        let bin = tidemark(&env, url, &["run"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&bin.stderr).to_string()
            + &String::from_utf8_lossy(&bin.stdout);

        // Assert
        eprintln!("{what}: failed after {took:?}: {msg}");
        assert!(
            msg.contains("target") && msg.to_lowercase().contains("certificate"),
            "{what}: the error names the target and the certificate: {msg}"
        );
        assert!(
            !msg.contains(PW),
            "{what}: the error shows the password: {msg}"
        );
        assert!(
            msg.contains("sslrootcert") && !msg.contains("exists and is writable"),
            "{what}: the hint points at the TLS settings: {msg}"
        );
        assert_eq!(
            bin.status.code(),
            Some(tidemark::exit::UNAVAILABLE),
            "{what}: {stderr}"
        );
        assert!(
            stderr.to_lowercase().contains("certificate"),
            "{what}: {stderr}"
        );
        assert!(
            !stderr.contains(PW),
            "{what}: the binary shows the password: {stderr}"
        );
        assert_eq!(
            pg_tables(&env.target_url).await,
            0,
            "{what}: something was written to the target"
        );
    }
}

/// A throwaway CA and a server certificate for `localhost` it signed, as PEM files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tidemark test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let pki = Pki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        std::fs::write(&pki.ca, ca.pem()).unwrap();
        std::fs::write(&pki.cert, cert.pem()).unwrap();
        std::fs::write(&pki.key, key.serialize_pem()).unwrap();
        pki
    }
}

/// A private SecantusDB that speaks only TLS, with the certificate directory it uses.
fn tls_mongod() -> (tempfile::TempDir, Pki, Mongod) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mongo = Mongod::start_args(
        false,
        &[
            "--tls-cert-file",
            pki.cert.to_str().unwrap(),
            "--tls-key-file",
            pki.key.to_str().unwrap(),
        ],
    );
    (dir, pki, mongo)
}

fn mongo_tls_uri(host: &str, port: u16, query: &str) -> String {
    format!("mongodb://{host}:{port}/?directConnection=true&{query}")
}

/// `tls=true&tlsCAFile=…` on `localhost`: the run reads every document over TLS (the server
/// accepts nothing else: see the plaintext case below).
#[tokio::test]
async fn mongo_tls_run_with_ca_file_lands_rows() {
    // Arrange
    let (_dir, pki, mongo) = tls_mongod();
    let uri = mongo_tls_uri(
        "localhost",
        mongo.port,
        &format!("tls=true&tlsCAFile={}", pki.ca.display()),
    );
    let env = Env::new_at(
        &uri,
        "mongotls",
        Backend::Sqlite,
        &items_mapping("epoch_millis"),
    )
    .await;
    let base = chrono::Utc::now().timestamp_millis() - 3 * 86_400_000;
    seed(&env, items(1_500, base, 10)).await;

    // Act
    let report = env.run(env.settings()).await.expect("a TLS run works");

    // Assert
    assert_eq!(report.totals.read, 1_500, "{report}");
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        1_500
    );
}

/// Against the TLS server: no `tlsCAFile` (the CA is not among the system roots), a host
/// name the certificate does not carry, and `tls=false` each fail within the connect
/// timeout, with an error that names the source, and without showing the password. Nothing
/// is written to the target.
#[tokio::test]
async fn mongo_tls_refuses_unknown_ca_wrong_host_and_plaintext() {
    // Arrange
    let (_dir, pki, mongo) = tls_mongod();
    let good = mongo_tls_uri(
        "localhost",
        mongo.port,
        &format!("tls=true&tlsCAFile={}", pki.ca.display()),
    );
    let env = Env::new_at(
        &good,
        "mongotlsbad",
        Backend::Sqlite,
        &items_mapping("epoch_millis"),
    )
    .await;
    let base = chrono::Utc::now().timestamp_millis() - 3 * 86_400_000;
    seed(&env, items(100, base, 10)).await;
    let with_pw = |host: &str, query: String| {
        format!(
            "mongodb://tm:{PW}@{host}:{}/?directConnection=true&authSource=admin&{query}",
            mongo.port
        )
    };
    let cases = [
        (
            "no tlsCAFile (unknown CA)",
            with_pw("localhost", "tls=true".into()),
            Some("certificate"),
        ),
        (
            "host name 127.0.0.1 not in the certificate",
            with_pw(
                "127.0.0.1",
                format!("tls=true&tlsCAFile={}", pki.ca.display()),
            ),
            Some("certificate"),
        ),
        (
            "tls=false against the TLS port",
            with_pw("localhost", "tls=false".into()),
            None,
        ),
    ];

    for (what, uri, expect) in &cases {
        // Act
        let mut s = env.settings();
        s.source.uri = SecretUri::new(uri.clone());
        s.source.connect_timeout = Duration::from_secs(2);
        let started = Instant::now();
        let err = env
            .run(s)
            .await
            .expect_err(&format!("the source must refuse {what}"));
        let took = started.elapsed();
        let msg = format!("{err:#}");

        // Assert
        eprintln!("{what}: failed after {took:?}: {msg}");
        assert!(
            msg.contains("cannot connect to the source") && msg.contains("source.uri"),
            "{what}: the error names the source: {msg}"
        );
        if let Some(word) = expect {
            assert!(
                msg.to_lowercase().contains(word),
                "{what}: the error says what is wrong ({word}): {msg}"
            );
        }
        assert!(
            !msg.contains(PW),
            "{what}: the error shows the password: {msg}"
        );
        assert!(
            took < Duration::from_secs(20),
            "{what}: took {took:?} to fail"
        );
        assert!(
            !env.dir.path().join("target.db").exists(),
            "{what}: the target was opened"
        );
    }
}
