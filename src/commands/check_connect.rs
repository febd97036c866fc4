//! `tidemark check-config --connect`: test the connections before anything runs (as Airbyte's
//! `check`): one line per check, OK, WARN or FAIL, with what to do on failure. Changes
//! nothing in the source or the target.

use crate::exit;
use crate::mapping::Mapping;
use crate::reach::Unreachable;
use crate::settings::Settings;
use crate::sink::{ddl, probe, Sink};
use crate::source::Source;
use std::fmt::Write as _;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// Every check's line, and the exit code they add up to.
#[derive(Debug, Default)]
pub struct Checks {
    lines: Vec<(Status, String)>,
    /// A connection failed (exit 6); other failures exit 5.
    unreachable: bool,
}

impl Checks {
    fn push(&mut self, status: Status, line: impl Into<String>) {
        self.lines.push((status, line.into()));
    }

    /// A failed check, worded by [`crate::reach`] when the error is a connection failure.
    fn fail(&mut self, what: &str, err: &anyhow::Error) {
        match err.downcast_ref::<Unreachable>() {
            Some(u) => self.fail_with(what, u),
            None => self.push(
                Status::Fail,
                format!("{what}: {}", crate::secret::redact_uri(&format!("{err:#}"))),
            ),
        }
    }

    fn fail_with(&mut self, what: &str, u: &Unreachable) {
        self.push(
            Status::Fail,
            format!("{what}: {} ({}). What to do: {}", u.what(), u.at, u.fix()),
        );
    }

    /// 0 when nothing failed; 6 when a connection failed; 5 for any other failure.
    pub fn exit_code(&self) -> i32 {
        if self.unreachable {
            exit::UNAVAILABLE
        } else if self.lines.iter().any(|(s, _)| *s == Status::Fail) {
            exit::CONFIG
        } else {
            exit::OK
        }
    }

    /// One line per check (`quiet`: only WARN and FAIL), then the tally.
    pub fn render(&self, quiet: bool) -> String {
        let mut out = String::new();
        for (status, line) in &self.lines {
            let tag = match status {
                Status::Ok if quiet => continue,
                Status::Ok => "OK  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            let _ = writeln!(out, "{tag}  {line}");
        }
        let count = |s| self.lines.iter().filter(|(x, _)| *x == s).count();
        let _ = writeln!(
            out,
            "{} OK, {} WARN, {} FAIL",
            count(Status::Ok),
            count(Status::Warn),
            count(Status::Fail)
        );
        out
    }
}

/// Run every check against the source and the target of `s` with `mapping`.
pub async fn check_connect(s: &Settings, mapping: &Mapping) -> Checks {
    let mut checks = Checks::default();
    check_source(s, mapping, &mut checks).await;
    check_target(s, mapping, &mut checks).await;
    checks
}

async fn check_source(s: &Settings, mapping: &Mapping, checks: &mut Checks) {
    let source = match Source::connect(&s.source).await {
        Ok(source) => source,
        Err(e) => {
            checks.unreachable = true;
            return checks.fail("source reachable and authenticated (ping)", &e);
        }
    };
    checks.push(
        Status::Ok,
        format!("source reachable and authenticated (ping {})", s.source.uri),
    );
    let db = &s.source.database;
    let names = match source.collection_names(&s.source).await {
        Ok(names) if names.is_empty() => {
            return checks.push(
                Status::Fail,
                format!(
                    "source database {db:?}: does not exist (no collections). What to do: fix \
                     source.database, or check that source.uri points at the right server"
                ),
            );
        }
        Ok(names) => names,
        Err(u) => {
            return checks.fail_with(&format!("source database {db:?} (listCollections)"), &u)
        }
    };
    checks.push(
        Status::Ok,
        format!(
            "source database {db:?} exists ({} collections)",
            names.len()
        ),
    );
    let mut seen = std::collections::BTreeSet::new();
    for e in &mapping.entities {
        if !seen.insert(e.collection.as_str()) {
            continue;
        }
        let what = format!("collection {} (entity {})", e.collection, e.name);
        if !names.contains(&e.collection) {
            checks.push(
                Status::Fail,
                format!(
                    "{what}: does not exist in {db:?}. What to do: fix `collection` of entity \
                     {} in {}, or source.database",
                    e.name,
                    s.sync.mapping.display()
                ),
            );
            continue;
        }
        match source.read_one(&s.source, &e.collection).await {
            Ok(any) => checks.push(
                Status::Ok,
                format!("{what}: readable{}", if any { "" } else { " (empty)" }),
            ),
            Err(u) => checks.fail_with(&format!("{what}: read one document"), &u),
        }
    }
    let selected =
        |name: &str| s.sync.entities.is_empty() || s.sync.entities.iter().any(|n| n == name);
    for e in mapping
        .entities
        .iter()
        .filter(|e| e.windowed && selected(&e.name))
    {
        if !names.contains(&e.collection) {
            continue;
        }
        let what = format!("index ({}, _id) on {}", e.time_field, e.collection);
        match source.missing_index_warning(e).await {
            Ok(None) => checks.push(Status::Ok, what),
            Ok(Some(warning)) => checks.push(Status::Warn, format!("{what}: {warning}")),
            Err(err) => checks.fail(&what, &err),
        }
    }
}

async fn check_target(s: &Settings, mapping: &Mapping, checks: &mut Checks) {
    let url = &s.target.url;
    if let Some(file) = probe::sqlite_file(url).filter(|f| !f.exists()) {
        match probe::sqlite_creatable(url, &file) {
            Ok(dir) => checks.push(
                Status::Ok,
                format!(
                    "target SQLite file {} does not exist yet; {} is writable, so `tidemark \
                     migrate` (or the first run) creates it",
                    file.display(),
                    dir.display()
                ),
            ),
            Err(u) => {
                checks.unreachable = true;
                checks.fail_with(&format!("target SQLite file {}", file.display()), &u);
            }
        }
        return not_migrated(checks);
    }
    let sink = match Sink::connect(url, 2).await {
        Ok(sink) => sink,
        Err(e) => {
            checks.unreachable = true;
            return checks.fail("target reachable and authenticated", &e);
        }
    };
    checks.push(
        Status::Ok,
        format!("target reachable and authenticated ({url})"),
    );
    target_rights(s, &sink, checks).await;
    match sink.tool_migrations().await {
        Ok((have, want)) if have >= want => {
            checks.push(Status::Ok, "tidemark's own tables migrated")
        }
        Ok((0, _)) => not_migrated(checks),
        Ok((have, want)) => checks.push(
            Status::Warn,
            format!(
                "tidemark's own tables: {have} of {want} migrations applied (written by an older tidemark); \
                 `tidemark migrate` (or the next run) would apply the other {}",
                want - have
            ),
        ),
        Err(e) => checks.fail("tidemark's own tables", &e),
    }
    match ddl::plan(&sink, mapping, s.target.foreign_key_checks).await {
        Ok(plan) if plan.apply.is_empty() && plan.manual.is_empty() => {
            checks.push(Status::Ok, "mapped tables present and up to date")
        }
        Ok(plan) => {
            if !plan.apply.is_empty() {
                checks.push(
                    Status::Warn,
                    format!(
                        "mapped tables: {} statement(s) pending; `tidemark migrate` would apply \
                         them (`tidemark migrate --print` shows them)",
                        plan.apply.len()
                    ),
                );
            }
            for m in &plan.manual {
                checks.push(Status::Warn, format!("mapped tables: {m}"));
            }
        }
        Err(e) => checks.fail("mapped tables", &e),
    }
    sink.close().await;
}

/// CREATE and INSERT in the target's schema, and `target.foreign_key_checks`' right.
async fn target_rights(s: &Settings, sink: &Sink, checks: &mut Checks) {
    match sink.check_writable(&s.target.url).await {
        Ok(()) => checks.push(
            Status::Ok,
            "target schema writable (a table created, written and rolled back)",
        ),
        Err(u) => checks.fail_with("target schema writable (create a table, insert a row)", &u),
    }
    if s.target.foreign_key_checks != crate::settings::ForeignKeyChecks::Database {
        match sink
            .check_foreign_key_checks(s.target.foreign_key_checks)
            .await
        {
            Ok(()) => checks.push(
                Status::Ok,
                "target.foreign_key_checks = \"tidemark\" allowed",
            ),
            Err(e) => checks.fail("target.foreign_key_checks = \"tidemark\"", &e),
        }
    }
}

fn not_migrated(checks: &mut Checks) {
    checks.push(
        Status::Warn,
        "tidemark's own tables not migrated yet: `tidemark migrate` (or the first run) would \
         create them",
    );
}
