//! The oracle's random source histories: each step inserts and updates documents whose times
//! lie in one hour, on 10-minute marks (window and chunk edges) and shared by many documents
//! (ties across pages).
//!
//! A few rules keep the final source enough to know the target (the model reads only the
//! final source, not the history): a reference whose policy can hold a row back or
//! dead-letter it (`skip`, `defer`, and the self-reference a held-back row takes along) is
//! fixed when its document is created, and points at a document that already exists or at
//! one that never will; a note referenced by a label is never deleted; a time, once valid,
//! stays valid. Otherwise an update that makes a reference dangle would leave the row
//! written before (by design: a dead letter or a held-back row does not delete it).

use crate::oracle_model::{key_of, Source};
use bson::{doc, oid::ObjectId, Bson, Document};
use chrono::{TimeZone, Utc};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;

pub const HOUR: i64 = 3_600_000;

pub fn base() -> i64 {
    Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0)
        .unwrap()
        .timestamp_millis()
}

pub fn iso(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// The ObjectId whose hex string is the twin of note `n`.
fn oid(n: i32) -> ObjectId {
    ObjectId::parse_str(format!("65a0000000000000000000{n:02x}")).unwrap()
}

/// One changed document: its collection and the filter that finds it.
pub struct Change {
    pub coll: &'static str,
    pub filter: Document,
    pub doc: Document,
}

struct Step<'a> {
    rng: &'a mut ChaCha8Rng,
    src: &'a mut Source,
    k: usize,
    from: i64,
    out: Vec<Change>,
}

/// Random changes of step `k`, whose times lie in `[from, from + HOUR)`.
pub fn step(rng: &mut ChaCha8Rng, src: &mut Source, k: usize, from: i64) -> Vec<Change> {
    let mut s = Step {
        rng,
        src,
        k,
        from,
        out: Vec::new(),
    };
    s.accounts();
    s.notes();
    s.studies();
    s.labels();
    s.out
}

impl Step<'_> {
    fn t(&mut self) -> i64 {
        self.from + self.rng.gen_range(0..6) * 600_000 + self.rng.gen_range(0..2)
    }

    /// An existing account (by key text), or a dangling key that never exists.
    fn account_ref(&mut self) -> String {
        let keys: BTreeSet<String> = self
            .src
            .accounts
            .values()
            .map(|d| key_of(d.get("accountId").unwrap()).0)
            .collect();
        if keys.is_empty() || self.rng.gen_bool(0.2) {
            format!("ghost{}", self.rng.gen_range(0..3))
        } else {
            keys.iter()
                .nth(self.rng.gen_range(0..keys.len()))
                .unwrap()
                .clone()
        }
    }

    fn push(&mut self, coll: &'static str, filter: Document, doc: Document) {
        self.out.push(Change { coll, filter, doc });
    }

    /// Accounts, some with an integer id (referenced by its text, as a pulled document).
    fn accounts(&mut self) {
        for _ in 0..self.rng.gen_range(1..4) {
            let n = self.rng.gen_range(0..5);
            let (key, id) = if self.rng.gen_bool(0.2) {
                (format!("i{n}"), Bson::Int32(700 + n))
            } else {
                (
                    format!("s{}{n}", self.k),
                    Bson::String(format!("a{}{n}", self.k)),
                )
            };
            let name = format!("n{}", self.rng.gen_range(0..9));
            let t = self.t();
            let d = doc! { "accountId": id.clone(), "name": name, "t": t };
            self.src.accounts.insert(key, d.clone());
            self.push("accounts", doc! { "accountId": id }, d);
        }
    }

    /// Notes: ids of five BSON types, of which some are twins (`7` and `"7"`, an ObjectId
    /// and its hex string); drafts, deletes, documents without a time.
    fn notes(&mut self) {
        for _ in 0..self.rng.gen_range(2..8) {
            let n: i32 = self.rng.gen_range(0..12);
            let id = match self.rng.gen_range(0..6) {
                0 => Bson::Int32(n),
                1 => Bson::String(n.to_string()),
                2 => Bson::Int64(5_000_000_000 + n as i64),
                3 => Bson::ObjectId(oid(n)),
                4 => Bson::String(oid(n).to_hex()),
                _ => Bson::String(format!("n{n}")),
            };
            let key = format!("{id:?}");
            let old = self.src.notes.get(&key).cloned();
            // A key a label points at stays a row, whichever document holds it.
            let kt = key_of(&id).0;
            let referenced = self
                .src
                .labels
                .values()
                .any(|l| l.get_str("note").ok() == Some(kt.as_str()));
            let author = self.account_ref();
            let body = format!("b{}", self.rng.gen_range(0..9));
            let mut d = doc! { "_id": id.clone(), "body": body, "author": author };
            // The editor (skip) is fixed at creation.
            let editor = match &old {
                Some(o) => o.get_str("editor").ok().map(str::to_owned),
                None if referenced => None,
                None => self.rng.gen_bool(0.3).then(|| self.account_ref()),
            };
            if let Some(e) = editor {
                d.insert("editor", e);
            }
            let had_time = old.as_ref().is_some_and(|o| o.get("at").is_some());
            // A string twin of another document always has a time: one never read cannot
            // take the key from a twin written before it (tidemark never sees it).
            let twin_string = matches!(&id, Bson::String(s) if !s.starts_with('n'));
            if had_time || referenced || twin_string || self.k == 0 || self.rng.gen_bool(0.9) {
                let t = self.t();
                d.insert("at", bson::DateTime::from_millis(t));
            }
            // A draft stays a draft (a filtered update leaves an earlier row, by design).
            let draft = match &old {
                Some(o) => o.get_bool("draft").unwrap_or(false),
                None => !referenced && self.rng.gen_bool(0.15),
            };
            if draft {
                d.insert("draft", true);
            }
            if !referenced && self.rng.gen_bool(0.15) {
                d.insert("gone", true);
            }
            self.src.notes.insert(key, d.clone());
            self.push("notes", doc! { "_id": id }, d);
        }
    }

    /// Studies: soft deletes, members, a deferred reviewer, a self-reference with cycles,
    /// documents without a time or with a malformed one.
    fn studies(&mut self) {
        let mut made = Vec::new();
        for _ in 0..self.rng.gen_range(2..8) {
            let id = format!("s{}", self.rng.gen_range(0..10));
            let old = self.src.studies.get(&id).cloned();
            let members: Vec<Bson> = (0..self.rng.gen_range(0..4))
                .map(|_| {
                    let mut m = doc! { "account": self.account_ref() };
                    if self.rng.gen_bool(0.3) {
                        m.insert("grader", self.account_ref());
                    }
                    Bson::Document(m)
                })
                .collect();
            let tags: Vec<&str> = (0..self.rng.gen_range(0..3))
                .map(|i| if i % 2 == 0 { "x" } else { "" })
                .collect();
            let title = format!("t{}", self.rng.gen_range(0..9));
            let mut d = doc! {
                "studyId": &id, "title": title,
                "owner": self.account_ref(), "members": members, "tags": tags,
            };
            let fixed = |f: &str| {
                old.as_ref()
                    .and_then(|o| o.get_str(f).ok().map(str::to_owned))
            };
            let (reviewer, parent) = match &old {
                Some(_) => (fixed("reviewer"), fixed("parent")),
                None => {
                    let r = self.rng.gen_bool(0.3).then(|| self.account_ref());
                    (r, self.parent_ref(&id))
                }
            };
            if let Some(r) = reviewer {
                d.insert("reviewer", r);
            }
            if let Some(p) = parent {
                d.insert("parent", p);
            }
            let had_time = old.as_ref().is_some_and(|o| o.get("updatedAt").is_some());
            let t = self.t();
            if had_time || self.rng.gen_bool(0.9) {
                d.insert("updatedAt", crate::oracle_gen::iso(t));
            } else if self.rng.gen_bool(0.5) {
                // Malformed, but inside the window's string range: read and dead-lettered.
                d.insert("updatedAt", format!("{}x", iso(t)));
            }
            if self.rng.gen_bool(0.3) {
                d.insert("removed", true);
            }
            if old.is_none() {
                made.push(id.clone());
            }
            self.src.studies.insert(id.clone(), d.clone());
            self.push("studies", doc! { "studyId": id }, d);
        }
        self.cycle(&made);
    }

    /// A study's parent when it is created: nothing, itself, a dangling key, or a study that
    /// exists with a valid time (then it keeps one).
    fn parent_ref(&mut self, id: &str) -> Option<String> {
        let timed: Vec<String> = self
            .src
            .studies
            .iter()
            .filter(|(_, d)| d.get_str("updatedAt").is_ok_and(|t| !t.ends_with('x')))
            .map(|(k, _)| k.clone())
            .collect();
        match self.rng.gen_range(0..5) {
            0 => Some(id.to_owned()),
            1 => Some(format!("gone{}", self.rng.gen_range(0..2))),
            2 | 3 if !timed.is_empty() => Some(timed[self.rng.gen_range(0..timed.len())].clone()),
            _ => None,
        }
    }

    /// Sometimes two studies made in this step point at each other (a cycle of two).
    fn cycle(&mut self, made: &[String]) {
        if made.len() < 2 || !self.rng.gen_bool(0.5) {
            return;
        }
        let (a, b) = (made[0].clone(), made[1].clone());
        for (x, y) in [(&a, &b), (&b, &a)] {
            let d = self.src.studies.get_mut(x).unwrap();
            d.insert("parent", y.clone());
            // Both need a valid time for the cycle to be one of rows.
            if !d.get_str("updatedAt").is_ok_and(|t| !t.ends_with('x')) {
                let t = self.from;
                d.insert("updatedAt", iso(t));
            }
            let d = d.clone();
            if let Some(c) = self
                .out
                .iter_mut()
                .rev()
                .find(|c| c.coll == "studies" && c.filter.get_str("studyId") == Ok(x.as_str()))
            {
                c.doc = d;
            }
        }
    }

    /// Labels pointing at notes (defer) by key text: an existing note's, or one never made.
    fn labels(&mut self) {
        for _ in 0..self.rng.gen_range(0..4) {
            let id = format!("l{}", self.rng.gen_range(0..8));
            let old = self.src.labels.get(&id).cloned();
            let note = match &old {
                Some(o) => o.get_str("note").ok().map(str::to_owned),
                None => self.note_ref(),
            };
            let t = self.t() / 1000;
            let text = format!("x{}", self.rng.gen_range(0..9));
            let mut d = doc! { "labelId": &id, "text": text, "ts": t };
            if let Some(n) = note {
                d.insert("note", n);
            }
            self.src.labels.insert(id.clone(), d.clone());
            self.push("labels", doc! { "labelId": id }, d);
        }
    }

    /// A note key for a label: one whose note is a row now and will stay one (not gone, not
    /// a draft, timed, an editor that exists, and no string twin that could take it later
    /// in another state), a dangling one, or none.
    fn note_ref(&mut self) -> Option<String> {
        if self.rng.gen_bool(0.2) {
            return None;
        }
        if self.rng.gen_bool(0.2) {
            return Some(format!("nope{}", self.rng.gen_range(0..2)));
        }
        let m = crate::oracle_model::model(self.src);
        let rows: Vec<String> = m.tables["notes"]
            .iter()
            .map(|r| r.split('|').next().unwrap().to_owned())
            .collect();
        if rows.is_empty() {
            return None;
        }
        Some(rows[self.rng.gen_range(0..rows.len())].clone())
    }
}
