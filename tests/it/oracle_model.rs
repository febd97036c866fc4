//! The oracle's generated domain: its mapping, the source as the test wrote it, and the
//! reference model — what the target must hold, computed from the whole final source by
//! the rules of docs/MAPPING.md and docs/DEPENDENCIES.md alone, written for clarity (no
//! batching, no memo, no pulled set, no provenance).
//!
//! The domain uses every mapping feature: references in main and child-table columns with
//! every missing-reference policy (`null`, `skip`, `defer`), a self-reference with cycles,
//! references across entities whose ids have mixed BSON types, child tables, soft delete,
//! delete, `skip_when`, a CEL macro with its own loop variable, four time encodings (epoch
//! seconds, epoch millis, BSON date, ISO-8601), and bad documents (no time, a malformed time).

use bson::{Bson, Document};
use std::collections::{BTreeMap, BTreeSet};

pub const MAPPING: &str = r#"
version = "oracle-2"
[entities.accounts]
collection = "accounts"
id_field = "accountId"
time_field = "t"
time_encoding = "epoch_millis"
table = "accounts"
primary_key = ["account_id"]
[entities.accounts.columns]
account_id = { path = "accountId", type = "text", required = true }
name = { path = "name", type = "text" }

[entities.notes]
collection = "notes"
time_field = "at"
time_encoding = "date"
table = "notes"
primary_key = ["id"]
skip_when = 'has(doc.draft) && doc.draft == true'
[entities.notes.deleted]
when = 'has(doc.gone) && doc.gone == true'
action = "delete"
[entities.notes.columns]
id = { path = "_id", type = "text", required = true }
body = { path = "body", type = "text" }
author = { path = "author", type = "text", references = "accounts", on_missing = "null" }
editor = { path = "editor", type = "text", references = "accounts", on_missing = "skip" }
at = { path = "at", type = "timestamptz", required = true }

[entities.studies]
collection = "studies"
id_field = "studyId"
time_field = "updatedAt"
time_encoding = "iso8601"
table = "studies"
primary_key = ["study_id"]
[entities.studies.deleted]
when = 'has(doc.removed) && doc.removed == true'
action = "soft_delete"
column = "removed_at"
[entities.studies.columns]
study_id = { path = "studyId", type = "text", required = true }
title = { path = "title", type = "text" }
owner = { path = "owner", type = "text", references = "accounts", on_missing = "null" }
reviewer = { path = "reviewer", type = "text", references = "accounts", on_missing = "defer" }
parent = { path = "parent", type = "text", references = "studies", on_missing = "null" }
tagged = { expr = "size(doc.tags.filter(tag, tag != ''))", type = "integer" }
updated_at = { path = "updatedAt", type = "timestamptz", from = "iso8601", required = true }
[entities.studies.children.members]
path = "members"
table = "members"
primary_key = ["study_id", "position"]
[entities.studies.children.members.columns]
study_id = { parent = "study_id", type = "text" }
position = { ordinal = true, type = "integer" }
account = { path = "account", type = "text", references = "accounts", on_missing = "null" }
grader = { path = "grader", type = "text", references = "accounts", on_missing = "skip" }

[entities.labels]
collection = "labels"
id_field = "labelId"
time_field = "ts"
time_encoding = "epoch_seconds"
table = "labels"
primary_key = ["label_id"]
[entities.labels.columns]
label_id = { path = "labelId", type = "text", required = true }
text = { path = "text", type = "text" }
note = { path = "note", type = "text", references = "notes", on_missing = "defer" }
"#;

/// The source as the test wrote it: collection → the test's own key → document.
#[derive(Default, Clone)]
pub struct Source {
    pub accounts: BTreeMap<String, Document>,
    pub notes: BTreeMap<String, Document>,
    pub studies: BTreeMap<String, Document>,
    pub labels: BTreeMap<String, Document>,
}

/// One table as comparable text rows.
pub type Table = BTreeSet<String>;

fn text(v: Option<&str>) -> String {
    v.map_or("~".into(), str::to_owned)
}

/// The key text of an id (docs/MAPPING.md, "How ids of different BSON types are keyed"),
/// and whether it is a string (a string keeps the key; a twin of another type loses it).
pub fn key_of(id: &Bson) -> (String, bool) {
    match id {
        Bson::String(s) => (s.clone(), true),
        Bson::Int32(i) => (i.to_string(), false),
        Bson::Int64(i) => (i.to_string(), false),
        Bson::ObjectId(o) => (o.to_hex(), false),
        other => panic!("generator made id {other:?}"),
    }
}

/// Of the documents sharing one key text, the one that keeps it: the string, else the only one.
fn winners<'a>(
    docs: impl Iterator<Item = (&'a Bson, &'a Document)>,
) -> BTreeMap<String, &'a Document> {
    let mut out: BTreeMap<String, (&Document, bool)> = BTreeMap::new();
    for (id, d) in docs {
        let (k, is_string) = key_of(id);
        match out.get(&k) {
            Some((_, true)) => {}
            Some((_, false)) if !is_string => panic!("generator made two typed twins of {k}"),
            _ => {
                out.insert(k, (d, is_string));
            }
        }
    }
    out.into_iter().map(|(k, (d, _))| (k, d)).collect()
}

/// What the target must hold.
pub struct Model {
    pub tables: BTreeMap<&'static str, Table>,
}

/// The model: what the target must hold, from the final source alone.
pub fn model(src: &Source) -> Model {
    let accounts = winners(
        src.accounts
            .values()
            .map(|d| (d.get("accountId").unwrap(), d)),
    );
    fn exists<'a>(accounts: &BTreeMap<String, &Document>, a: Option<&'a str>) -> Option<&'a str> {
        a.filter(|a| accounts.contains_key(*a))
    }
    let account = |a| exists(&accounts, a);
    let mut tables: BTreeMap<&'static str, Table> = BTreeMap::new();
    tables.insert(
        "accounts",
        accounts
            .iter()
            .map(|(k, d)| format!("{k}|{}", text(d.get_str("name").ok())))
            .collect(),
    );

    // notes: a string id keeps its key; then the time, the delete rule, skip_when, and the
    // editor (skip: a missing one makes the note a dead letter).
    let mut notes = Table::new();
    let mut note_keys = BTreeSet::new();
    for (k, d) in winners(src.notes.values().map(|d| (d.get("_id").unwrap(), d))) {
        let valid_time = matches!(d.get("at"), Some(Bson::DateTime(_)));
        let gone = d.get_bool("gone").unwrap_or(false);
        let draft = d.get_bool("draft").unwrap_or(false);
        let editor = d.get_str("editor").ok();
        if !valid_time || gone || draft || editor.is_some_and(|e| account(Some(e)).is_none()) {
            continue;
        }
        note_keys.insert(k.clone());
        notes.insert(format!(
            "{k}|{}|{}|{}",
            text(d.get_str("body").ok()),
            text(account(d.get_str("author").ok())),
            text(editor)
        ));
    }
    tables.insert("notes", notes);

    // studies: every one with a valid time is a row (soft-deleted ones marked), unless held
    // back: its reviewer is missing (defer), or its parent is held back (a row held back
    // takes along every row that points at it), to a fixpoint (cycles).
    let timed: BTreeMap<&String, &Document> = src
        .studies
        .iter()
        .filter(|(_, d)| {
            d.get_str("updatedAt")
                .is_ok_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok())
        })
        .collect();
    let mut held: BTreeSet<&String> = timed
        .iter()
        .filter(|(_, d)| {
            d.get_str("reviewer")
                .is_ok_and(|r| account(Some(r)).is_none())
        })
        .map(|(k, _)| *k)
        .collect();
    loop {
        let more: Vec<&String> = timed
            .iter()
            .filter(|(k, d)| {
                !held.contains(*k)
                    && d.get_str("parent")
                        .is_ok_and(|p| held.iter().any(|h| h.as_str() == p))
            })
            .map(|(k, _)| *k)
            .collect();
        if more.is_empty() {
            break;
        }
        held.extend(more);
    }
    let mut studies = Table::new();
    let mut members = Table::new();
    for (k, d) in &timed {
        if held.contains(k) {
            continue;
        }
        let tags = d.get_array("tags").map_or(0, |a| {
            a.iter()
                .filter(|t| t.as_str().is_some_and(|s| !s.is_empty()))
                .count()
        });
        let parent = d
            .get_str("parent")
            .ok()
            .filter(|p| timed.contains_key(&p.to_string()));
        studies.insert(format!(
            "{k}|{}|{}|{}|{}|{tags}|{}",
            text(d.get_str("title").ok()),
            text(account(d.get_str("owner").ok())),
            text(d.get_str("reviewer").ok()),
            text(parent),
            d.get_bool("removed").unwrap_or(false) as u8
        ));
        // Members: a missing account is nulled; a missing grader drops that member (skip).
        for (p, m) in d.get_array("members").into_iter().flatten().enumerate() {
            let m = m.as_document().unwrap();
            let grader = m.get_str("grader").ok();
            if grader.is_some_and(|g| account(Some(g)).is_none()) {
                continue;
            }
            members.insert(format!(
                "{k}|{p}|{}|{}",
                text(account(m.get_str("account").ok())),
                text(grader)
            ));
        }
    }
    tables.insert("studies", studies);
    tables.insert("members", members);

    // labels: held back while their note has no row (defer).
    let mut labels = Table::new();
    for (k, d) in &src.labels {
        let note = d.get_str("note").ok();
        if note.is_some_and(|n| !note_keys.contains(n)) {
            continue;
        }
        labels.insert(format!(
            "{k}|{}|{}",
            text(d.get_str("text").ok()),
            text(note)
        ));
    }
    tables.insert("labels", labels);
    Model { tables }
}

/// The target's tables in the model's text form.
pub async fn target(url: &str) -> BTreeMap<&'static str, Table> {
    let queries = [
        ("accounts", "SELECT account_id || '|' || COALESCE(name, '~') FROM accounts"),
        (
            "notes",
            "SELECT id || '|' || COALESCE(body, '~') || '|' || COALESCE(author, '~') || '|' \
             || COALESCE(editor, '~') FROM notes",
        ),
        (
            "studies",
            "SELECT study_id || '|' || COALESCE(title, '~') || '|' || COALESCE(owner, '~') || '|' \
             || COALESCE(reviewer, '~') || '|' || COALESCE(parent, '~') || '|' \
             || CAST(tagged AS TEXT) || '|' \
             || CASE WHEN removed_at IS NULL THEN '0' ELSE '1' END FROM studies",
        ),
        (
            "members",
            "SELECT study_id || '|' || CAST(position AS TEXT) || '|' || COALESCE(account, '~') \
             || '|' || COALESCE(grader, '~') FROM members",
        ),
        (
            "labels",
            "SELECT label_id || '|' || COALESCE(text, '~') || '|' || COALESCE(note, '~') FROM labels",
        ),
    ];
    let mut out = BTreeMap::new();
    for (t, q) in queries {
        out.insert(t, crate::oracle::strings(url, q).await);
    }
    out
}
