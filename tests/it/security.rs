//! Security: passwords never leak (logs, JSON logs, status, reports, metrics, errors), not
//! even in generated connection strings with credentials in every position (issue 29),
//! SCRAM authentication against a server started with `--auth`, and the source is never
//! written (every command the run sends is seen by a sniffing proxy).

use crate::fault_util::{Mongod, Proxy};
use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use crate::ops_util::items;
use bson::doc;
use std::process::Command;
use std::sync::{Arc, Mutex};

const MONGO_PW: &str = "Mg-s3cret-7f1d";
const PG_PW: &str = "Pg-s3cret-90aa";

/// Create the first user through the localhost exception (no credentials yet).
async fn create_user(mongo: &Mongod) {
    let c = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap();
    c.database("admin")
        .run_command(doc! { "createUser": "tm", "pwd": MONGO_PW, "roles": ["root"] })
        .await
        .expect("createUser through the localhost exception");
}

#[tokio::test]
async fn scram_auth_works_and_no_output_shows_a_password() {
    // Arrange: a server with --auth and a user; data written with credentials.
    let mongo = Mongod::start_with(true);
    create_user(&mongo).await;
    let uri = format!(
        "mongodb://tm:{MONGO_PW}@127.0.0.1:{}/?directConnection=true&authSource=admin",
        mongo.port
    );
    let env = Env::new_at(
        &uri,
        "secret",
        Backend::Postgres,
        &items_mapping("epoch_millis"),
    )
    .await;
    let base = chrono::Utc::now().timestamp_millis() - 5 * 86_400_000;
    env.insert("items", items(3_000, base, 10)).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    // PostgreSQL here trusts local connections, so any password is accepted: it must still
    // never be printed.
    let target = env
        .target_url
        .replacen("postgres@", &format!("postgres:{PG_PW}@"), 1);
    assert!(target.contains(PG_PW));
    let textfile = env.dir.path().join("metrics.prom");
    let bin = env!("CARGO_BIN_EXE_tidemark");
    let cmd = |args: &[&str]| {
        let mut c = Command::new(bin);
        c.args(args)
            .envs(env.env_vars(&target))
            .env("TIDEMARK__LOG__LEVEL", "debug")
            .env("RUST_LOG", "debug");
        c
    };

    // Act: a run (JSON logs at debug level, metrics textfile), status, check-config, then a
    // run with a wrong password and one against an unreachable target.
    let run = cmd(&["run", "--textfile", textfile.to_str().unwrap()])
        .output()
        .unwrap();
    let status = cmd(&["status", "--json"]).output().unwrap();
    let check = cmd(&["check-config"]).output().unwrap();
    let human = cmd(&["status"])
        .env("TIDEMARK__LOG__FORMAT", "human")
        .output()
        .unwrap();
    let wrong_pw = cmd(&["run"])
        .env(
            "TIDEMARK__SOURCE__URI",
            uri.replace(MONGO_PW, &format!("{MONGO_PW}x")),
        )
        .output()
        .unwrap();
    let dead_target = cmd(&["run"])
        .env(
            "TIDEMARK__TARGET__URL",
            format!("postgres://postgres:{PG_PW}@127.0.0.1:1/nope"),
        )
        .output()
        .unwrap();

    // Assert: the authenticated run worked, the wrong password is refused clearly.
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert!(run.status.success(), "{}", text(&run));
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        3_000
    );
    assert!(!wrong_pw.status.success());
    assert!(
        text(&wrong_pw).to_lowercase().contains("auth"),
        "{}",
        text(&wrong_pw)
    );
    assert!(!dead_target.status.success());
    let mut outputs = vec![
        ("run", text(&run)),
        ("status --json", text(&status)),
        ("status", text(&human)),
        ("check-config", text(&check)),
        ("run with a wrong password", text(&wrong_pw)),
        ("run against a dead target", text(&dead_target)),
        (
            "metrics textfile",
            std::fs::read_to_string(&textfile).unwrap(),
        ),
    ];
    for entry in std::fs::read_dir(env.dir.path().join("reports"))
        .into_iter()
        .flatten()
    {
        let p = entry.unwrap().path();
        outputs.push((
            "report file",
            std::fs::read_to_string(&p).unwrap_or_default(),
        ));
    }
    let ledger = crate::fault_kill::texts(
        &env.target_url,
        "SELECT COALESCE(report, '') || ' ' || settings_fingerprint FROM tidemark_runs",
    )
    .await;
    outputs.push(("tidemark_runs", ledger.join("\n")));
    let dead = crate::fault_kill::texts(
        &env.target_url,
        "SELECT error || document FROM tidemark_dead_letters",
    )
    .await;
    outputs.push(("dead letters", dead.join("\n")));
    assert!(
        outputs[0].1.contains("\"level\""),
        "JSON logs were captured: {}",
        outputs[0].1
    );
    for (what, out) in &outputs {
        for pw in [MONGO_PW, PG_PW] {
            assert!(!out.contains(pw), "{what} shows a password:\n{out}");
        }
    }
}

/// Over a full multi-entity run with dependencies, every command sent to the source is a
/// read: none of insert, update, delete, findAndModify, create, drop, createIndexes, ...
#[tokio::test]
async fn the_source_is_never_written() {
    // Arrange: the demo data set on a private server, reached through a sniffing proxy.
    let mongo = Mongod::start();
    let env = crate::fault_kill::demo_env(&mongo.uri(), "readonly", Backend::Sqlite, 300, 7).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let proxy = Proxy::sniffing(([127, 0, 0, 1], mongo.port).into(), seen.clone()).await;
    let mut s = env.settings();
    s.source.uri = tidemark::secret::SecretUri::new(format!(
        "mongodb://127.0.0.1:{}/?directConnection=true",
        proxy.port()
    ));
    s.sync.start = "2015-01-01T00:00:00Z".parse().unwrap();
    s.sync.error_budget = 100_000;

    // Act
    let report = env.run(s.clone()).await.expect("run");
    let json = tidemark::cli::StatusArgs {
        json: true,
        ..Default::default()
    };
    let status = tidemark::commands::status::status(&s, &json).await;

    // Assert
    assert!(report.totals.read > 1000, "{report}");
    let _ = status;
    let seen = seen.lock().unwrap().clone();
    let reads = [
        "hello",
        "isMaster",
        "ismaster",
        "ping",
        "find",
        "getMore",
        "killCursors",
        "aggregate",
        "count",
        "listIndexes",
        "listCollections",
        "buildInfo",
        "endSessions",
        "saslStart",
        "saslContinue",
        "distinct",
        "explain",
    ];
    let unexpected: Vec<&String> = seen
        .iter()
        .filter(|c| !reads.contains(&c.as_str()))
        .collect();
    assert!(
        seen.iter().any(|c| c == "find"),
        "the proxy saw the run's reads: {seen:?}"
    );
    assert!(
        unexpected.is_empty(),
        "commands other than reads reached the source: {unexpected:?}"
    );
}

/// The metrics endpoint is off by default, and a bare port binds the loopback interface.
#[test]
fn metrics_endpoint_binds_localhost_by_default() {
    let s = tidemark::settings::Settings::load(None).unwrap();
    assert_eq!(s.daemon.metrics_listen, "", "off unless configured");
    let addr = tidemark::schedule::listen_addr("9464").unwrap();
    assert!(addr.ip().is_loopback(), "{addr}");
}

/// A word of a generated secret: never an ordinary word of an output.
fn secret_word() -> proptest::strategy::BoxedStrategy<String> {
    use proptest::strategy::Strategy;
    "Q[A-Z]{2}[0-9][A-Z0-9]{3,5}".boxed()
}

/// Secret words joined by characters drawn from `seps`, and the words.
fn generated_secret(
    runner: &mut proptest::test_runner::TestRunner,
    seps: &[&'static str],
) -> (String, Vec<String>) {
    use proptest::strategy::{Strategy, ValueTree};
    let strategy = proptest::collection::vec(
        (secret_word(), proptest::sample::select(seps.to_vec())),
        1..=3,
    );
    let parts = strategy.new_tree(runner).unwrap().current();
    let mut s = String::new();
    let mut words = Vec::new();
    for (w, sep) in parts {
        s.push_str(&w);
        s.push_str(sep);
        words.push(w);
    }
    (s, words)
}

/// Reserved characters, quotes, escapes and non-ASCII, as people type them in passwords.
const PASSWORD_SEPS: &[&str] = &[
    "@", "/", ":", "?", "#", "[", "]", "&", "=", "%", "+", ",", ";", "\"", "'", "\\", " ", "é",
    "%40", "%2F", "://", "",
];
/// What may stand unencoded in an option's value.
const OPTION_SEPS: &[&str] = &[":", ",", "/", "+", "=", "?", "#", "%2B", "%26", "-", ""];

/// Issue 29: generated connection strings with credentials in every position (userinfo with
/// unencoded reserved characters, raw or percent-encoded, and every secret-bearing option of
/// both drivers) pushed through every output path of the binary: check-config, the errors
/// of run/status/verify against unreachable hosts, JSON and human logs at debug level, the
/// metrics textfile and the reports directory; plus one reachable PostgreSQL target, where
/// sqlx logs the value of every option it does not know. No secret word may appear; the
/// hosts must stay readable.
#[tokio::test]
async fn generated_credentials_never_reach_any_output() {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    // Arrange: a reachable PostgreSQL database of its own, and a fixed seed.
    let env = Env::new(
        "secretgen",
        Backend::Postgres,
        &items_mapping("epoch_millis"),
    )
    .await;
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[29; 32]),
    );
    let bin = env!("CARGO_BIN_EXE_tidemark");
    let textfile = env.dir.path().join("metrics.prom");
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let db = env.target_url.rsplit('/').next().unwrap().to_string();
    for case in 0..5u8 {
        let mut words = Vec::new();
        let mut secret = |runner: &mut TestRunner, seps| {
            let (s, w) = generated_secret(runner, seps);
            words.extend(w);
            s
        };
        let encode = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        let (mpw, ppw) = (
            secret(&mut runner, PASSWORD_SEPS),
            secret(&mut runner, PASSWORD_SEPS),
        );
        let (token, keypw, proxypw) = (
            secret(&mut runner, OPTION_SEPS),
            secret(&mut runner, OPTION_SEPS),
            secret(&mut runner, OPTION_SEPS),
        );
        let (sslpw, qpw, oauth) = (
            secret(&mut runner, OPTION_SEPS),
            secret(&mut runner, OPTION_SEPS),
            secret(&mut runner, OPTION_SEPS),
        );
        let mhost = format!("127.0.0.{}", 10 + case);
        let source = format!(
            "mongodb://tm:{}@{mhost}:1,{mhost}:2/?connectTimeoutMS=500&serverSelectionTimeoutMS=500\
             &authMechanismProperties=SERVICE_NAME:mongodb,AWS_SESSION_TOKEN:{token}\
             &tlsCertificateKeyFilePassword={keypw}&proxyPassword={proxypw}",
            if case % 2 == 0 { mpw.clone() } else { encode(&mpw) }
        );
        // Odd cases: the real server with a password it ignores (trust), so sqlx parses the
        // URL and logs the options it does not know; even cases: an unreachable host.
        let (phost, target) = if case % 2 == 1 {
            let h = "127.0.0.1".to_string();
            let t = format!(
                "postgres://postgres:{}@{h}:5432/{db}?sslmode=disable&sslpassword={sslpw}\
                 &oauth_client_secret={oauth}&password={qpw}",
                encode(&ppw)
            );
            (h, t)
        } else {
            let h = format!("127.0.0.{}", 20 + case);
            let t = format!(
                "postgres://tm:{ppw}@{h}:1/v3?sslpassword={sslpw}&oauth_client_secret={oauth}\
                 &password={qpw}"
            );
            (h, t)
        };
        let cmd = |args: &[&str], format: &str| {
            let mut c = Command::new(bin);
            c.args(args)
                .envs(env.env_vars(&target))
                .env("TIDEMARK__SOURCE__URI", &source)
                .env("TIDEMARK__SOURCE__CONNECT_TIMEOUT", "1s")
                .env("TIDEMARK__LOG__FORMAT", format)
                .env("TIDEMARK__LOG__LEVEL", "debug")
                .env("RUST_LOG", "debug");
            c
        };

        // Act: every command and format.
        let _ = std::fs::remove_file(&textfile);
        let check = cmd(&["check-config"], "json").output().unwrap();
        let run_json = cmd(&["run", "--textfile", textfile.to_str().unwrap()], "json")
            .output()
            .unwrap();
        let run_human = cmd(&["run"], "human").output().unwrap();
        let status_json = cmd(&["status", "--json"], "json").output().unwrap();
        let status = cmd(&["status"], "human").output().unwrap();
        let verify = cmd(&["verify", "--from", "-2d", "--to", "-1d"], "json")
            .output()
            .unwrap();

        // Assert: the failures are reported, naming the hosts, and no secret word shows.
        assert!(check.status.success(), "{}", text(&check));
        let check_out = text(&check);
        for h in [&mhost, &phost] {
            assert!(
                check_out.contains(h.as_str()),
                "host {h} readable:\n{check_out}"
            );
        }
        assert!(!run_json.status.success(), "{}", text(&run_json));
        let run_out = text(&run_json);
        assert!(
            run_out.contains(&mhost) || run_out.contains(&phost),
            "the error names a host:\n{run_out}"
        );
        let mut outputs = vec![
            ("check-config", check_out),
            ("run (JSON logs)", run_out),
            ("run (human logs)", text(&run_human)),
            ("status --json", text(&status_json)),
            ("status", text(&status)),
            ("verify", text(&verify)),
            (
                "metrics textfile",
                std::fs::read_to_string(&textfile).unwrap_or_default(),
            ),
        ];
        for entry in std::fs::read_dir(env.dir.path().join("reports"))
            .into_iter()
            .flatten()
        {
            let p = entry.unwrap().path();
            outputs.push((
                "report file",
                std::fs::read_to_string(&p).unwrap_or_default(),
            ));
        }
        for (what, out) in &outputs {
            for w in &words {
                assert!(
                    !out.contains(w.as_str()),
                    "case {case}: {what} shows {w} (source {source:?}, target {target:?}):\n{out}"
                );
            }
        }
    }
}
