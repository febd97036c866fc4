//! The verdict on each key of the range: same, counted apart (dead letter, pending, soft
//! delete) or different, with the columns and child rows that differ; and the sums per
//! time bucket.

use super::expect::{Entry, Expected};
use super::{Bucket, ChildDiff, ColumnDiff, EntityVerify, RowDiff};
use crate::engine::window::fmt_ts;
use crate::mapping::canon;
use crate::mapping::{Child, Entity, TableRef, Value};
use crate::sink::verify::Record;
use chrono::{DateTime, Utc};
use indexmap::IndexMap;
use serde_json::Value as J;
use std::collections::{BTreeMap, HashMap};

/// Characters of a value shown in a report before it is cut.
pub(super) const SHOWN_CHARS: usize = 120;

#[derive(Default)]
pub(super) struct Side {
    pub(super) rows: u64,
    pub(super) hash: u128,
}

/// The verdict on one key of the range. A key seen again in a later page (two source
/// documents for one key, the later one wins as in a run) replaces its earlier verdict.
pub(super) struct Verdict {
    pub(super) bucket: i64,
    /// Hash of the expected row, when the target must hold one.
    pub(super) source: Option<u128>,
    /// Hash of the target's row, when it holds one.
    pub(super) target: Option<u128>,
    pub(super) kind: Kind,
}

pub(super) enum Kind {
    Same,
    SoftDeleted,
    DeadLettered,
    Deferred,
    /// Nothing expected and nothing to count (deleted and absent, recorded as unmappable).
    Nothing,
    /// A difference (`missing`, `different`, `extra`), with its details while the report
    /// has room for them.
    Differs(&'static str, Option<Box<RowDiff>>),
}

pub(super) struct Acc<'a> {
    pub(super) e: &'a Entity,
    pub(super) out: EntityVerify,
    pub(super) bucket_ms: i64,
    pub(super) limit: usize,
    /// Every key of the range, in the order first decided.
    pub(super) verdicts: IndexMap<String, Verdict>,
    /// Verdicts holding details.
    pub(super) detailed: usize,
}

pub(super) fn xor(h: &str) -> u128 {
    u128::from_str_radix(h, 16).unwrap_or(0)
}

impl Acc<'_> {
    pub(super) fn bucket_of(&self, t: Option<DateTime<Utc>>) -> i64 {
        let ms = t.map_or(0, |t| t.timestamp_millis());
        ms.div_euclid(self.bucket_ms) * self.bucket_ms
    }

    /// Record the verdict on `key`, replacing an earlier one.
    pub(super) fn decide(&mut self, key: String, mut v: Verdict) {
        if let Some(old) = self.verdicts.shift_remove(&key) {
            if matches!(old.kind, Kind::Differs(_, Some(_))) {
                self.detailed -= 1;
            }
        }
        if let Kind::Differs(_, d) = &mut v.kind {
            if d.is_some() {
                if self.detailed < self.limit {
                    self.detailed += 1;
                } else {
                    *d = None;
                }
            }
        }
        self.verdicts.insert(key, v);
    }

    /// A difference on `key`.
    pub(super) fn differ(
        &mut self,
        when: Option<DateTime<Utc>>,
        source: Option<u128>,
        target: Option<u128>,
        d: RowDiff,
    ) {
        let key = d.key.clone();
        let v = Verdict {
            bucket: self.bucket_of(when),
            source,
            target,
            kind: Kind::Differs(d.state, Some(Box::new(d))),
        };
        self.decide(key, v);
    }

    /// Sum the verdicts into the report: counts, listed keys, details and buckets.
    pub(super) fn finish(mut self) -> EntityVerify {
        let mut buckets: BTreeMap<i64, (Side, Side)> = BTreeMap::new();
        let out = &mut self.out;
        for (key, v) in std::mem::take(&mut self.verdicts) {
            let (s, t) = buckets.entry(v.bucket).or_default();
            if let Some(h) = v.source {
                s.rows += 1;
                s.hash ^= h;
                out.source_rows += 1;
            }
            if let Some(h) = v.target {
                t.rows += 1;
                t.hash ^= h;
                out.target_rows += 1;
            }
            match v.kind {
                Kind::Same | Kind::Nothing => {}
                Kind::SoftDeleted => out.soft_deleted += 1,
                Kind::DeadLettered => out.dead_lettered += 1,
                Kind::Deferred => out.deferred += 1,
                Kind::Differs(state, d) => {
                    let (list, count) = match state {
                        "missing" => (&mut out.missing, &mut out.missing_count),
                        "extra" => (&mut out.extra, &mut out.extra_count),
                        _ => (&mut out.different, &mut out.different_count),
                    };
                    *count += 1;
                    if list.len() < self.limit {
                        list.push(key);
                    }
                    if let Some(d) = d {
                        out.details.push(*d);
                    }
                }
            }
        }
        out.buckets = buckets.len();
        for (b, (s, t)) in &buckets {
            if s.rows != t.rows || s.hash != t.hash {
                out.differing_buckets.push(Bucket {
                    from: fmt_ts(crate::sink::from_ms(*b)),
                    source_rows: s.rows,
                    target_rows: t.rows,
                    source_hash: format!("{:032x}", s.hash),
                    target_hash: format!("{:032x}", t.hash),
                });
            }
        }
        self.out
    }
}

/// A column name that may hold a credential: its values are never shown.
pub(super) fn secret_column(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "api_key",
        "apikey",
        "credential",
        "private_key",
    ]
    .iter()
    .any(|s| n.contains(s))
}

/// A canonical value as shown in a report: cut after [`SHOWN_CHARS`] characters, hidden
/// for columns that may hold a credential.
pub fn shown(column: &str, v: J) -> J {
    if v.is_null() {
        return v;
    }
    if secret_column(column) {
        return J::String("<hidden: the column may hold a credential>".into());
    }
    let text = match &v {
        J::String(s) => s.clone(),
        other => other.to_string(),
    };
    let n = text.chars().count();
    if n <= SHOWN_CHARS {
        return v;
    }
    let head: String = text.chars().take(SHOWN_CHARS).collect();
    J::String(format!("{head}… ({n} characters)"))
}

/// The columns of two rows of `t` whose canonical values differ.
pub(super) fn column_diffs(t: TableRef<'_>, source: &[Value], target: &[Value]) -> Vec<ColumnDiff> {
    t.columns
        .iter()
        .zip(source.iter().zip(target))
        .filter_map(|(c, (s, v))| {
            let (s, v) = (canon::value(s, c.ty), canon::value(v, c.ty));
            (s != v).then(|| ColumnDiff {
                column: c.name.clone(),
                source: shown(&c.name, s),
                target: shown(&c.name, v),
            })
        })
        .collect()
}

/// The child rows of one parent that differ between the two sides.
pub(super) fn child_diffs(
    c: &Child,
    source: &[Vec<Value>],
    target: &[Vec<Value>],
) -> Vec<ChildDiff> {
    let t = c.table_ref();
    let index = |rows: &[Vec<Value>]| -> BTreeMap<String, usize> {
        rows.iter()
            .enumerate()
            .map(|(i, r)| (canon::key_of_row(t, r), i))
            .collect()
    };
    let (s, d) = (index(source), index(target));
    let mut out = Vec::new();
    for (k, &i) in &s {
        match d.get(k) {
            None => out.push(ChildDiff {
                table: c.table.clone(),
                key: k.clone(),
                state: "missing",
                columns: Vec::new(),
            }),
            Some(&j) => {
                let columns = column_diffs(t, &source[i], &target[j]);
                if !columns.is_empty() {
                    out.push(ChildDiff {
                        table: c.table.clone(),
                        key: k.clone(),
                        state: "different",
                        columns,
                    });
                }
            }
        }
    }
    for k in d.keys().filter(|k| !s.contains_key(*k)) {
        out.push(ChildDiff {
            table: c.table.clone(),
            key: k.clone(),
            state: "extra",
            columns: Vec::new(),
        });
    }
    out
}
/// Canonical group key of child rows (their link to the parent) and of a parent row.
pub(super) fn link_of_child(c: &Child, row: &[Value]) -> String {
    let v: Vec<J> = c
        .parent_links
        .iter()
        .map(|(ci, _)| canon::value(&row[*ci], c.columns[*ci].ty))
        .collect();
    J::Array(v).to_string()
}

pub(super) fn link_of_parent(c: &Child, row: &[Value]) -> String {
    let v: Vec<J> = c
        .parent_links
        .iter()
        .map(|(ci, p)| canon::value(&row[*p], c.columns[*ci].ty))
        .collect();
    J::Array(v).to_string()
}

/// Hash of a row with its child rows (each child table's row hashes, sorted).
pub(super) fn full_hash(e: &Entity, row: &[Value], kids: &[Vec<Vec<Value>>]) -> String {
    let mut text = canon::row_hash(e.table_ref(), row);
    for (c, rows) in e.children.iter().zip(kids) {
        let mut hs: Vec<String> = rows
            .iter()
            .map(|r| canon::row_hash(c.table_ref(), r))
            .collect();
        hs.sort();
        text.push('|');
        text.push_str(&hs.join(","));
    }
    canon::hash_text(&text)
}

/// The target child rows of each parent, per child table, keyed by the parent link.
pub(super) fn group_children(
    e: &Entity,
    children: Vec<Vec<Vec<Value>>>,
) -> Vec<HashMap<String, Vec<Vec<Value>>>> {
    e.children
        .iter()
        .zip(children)
        .map(|(c, rows)| {
            let mut m: HashMap<String, Vec<Vec<Value>>> = HashMap::new();
            for r in rows {
                m.entry(link_of_child(c, &r)).or_default().push(r);
            }
            m
        })
        .collect()
}
/// The hash of a target row with its child rows.
pub(super) fn target_hash(
    e: &Entity,
    row: &[Value],
    t_kids: &[HashMap<String, Vec<Vec<Value>>>],
) -> u128 {
    let kids: Vec<Vec<Vec<Value>>> = e
        .children
        .iter()
        .zip(t_kids.iter())
        .map(|(c, m)| m.get(&link_of_parent(c, row)).cloned().unwrap_or_default())
        .collect();
    xor(&full_hash(e, row, &kids))
}

/// What the target holds for one key: its row and that row's hash (with its child rows),
/// the tool's record of the document, and the target's child rows of the page by parent
/// link ([`group_children`]).
pub(super) struct InTarget<'a> {
    pub(super) row: Option<&'a Vec<Value>>,
    pub(super) hash: Option<u128>,
    pub(super) record: Option<Record>,
    pub(super) kids: &'a [HashMap<String, Vec<Vec<Value>>>],
}

/// The verdict on one entry of a page, given what the target holds for its key.
pub(super) fn judge(
    acc: &mut Acc<'_>,
    en: Entry,
    when: Option<DateTime<Utc>>,
    target: InTarget<'_>,
) {
    let case = Case {
        bucket: acc.bucket_of(when),
        acc,
        key: en.key,
        when,
        target,
    };
    match en.expected {
        Expected::Gone { .. } => case.gone(),
        Expected::Marked { at, .. } => case.marked(&at),
        Expected::Row {
            row,
            children,
            soft,
        } => match &en.held {
            Some(why) => case.held(why),
            None => case.row(&row, &children, soft),
        },
    }
}

/// One key being judged: where its verdict goes, and what the target holds for it.
struct Case<'a, 'e> {
    acc: &'a mut Acc<'e>,
    key: String,
    when: Option<DateTime<Utc>>,
    bucket: i64,
    target: InTarget<'a>,
}

impl Case<'_, '_> {
    /// A verdict of `kind` with the target's hash only.
    fn verdict(&self, kind: Kind) -> Verdict {
        Verdict {
            bucket: self.bucket,
            source: None,
            target: self.target.hash,
            kind,
        }
    }

    fn decide(self, v: Verdict) {
        self.acc.decide(self.key, v)
    }

    /// The plain verdict of `kind`.
    fn settle(self, kind: Kind) {
        let v = self.verdict(kind);
        self.decide(v)
    }

    /// A difference in `state`, without columns or child rows.
    fn diff(&self, state: &'static str, reason: Option<String>) -> RowDiff {
        RowDiff {
            key: self.key.clone(),
            state,
            reason,
            columns: Vec::new(),
            children: Vec::new(),
        }
    }

    fn differ(self, source: Option<u128>, target: Option<u128>, d: RowDiff) {
        self.acc.differ(self.when, source, target, d)
    }

    /// Deleted by the deleted rule: the target must hold no row.
    fn gone(self) {
        if self.target.row.is_none() {
            return self.settle(Kind::Nothing);
        }
        let d = self.diff("different", Some("deleted in the source".into()));
        let th = self.target.hash;
        self.differ(None, th, d)
    }

    /// Soft-deleted, the document no longer maps: the row (if any) must carry the marker `at`.
    fn marked(self, at: &Value) {
        let e = self.acc.e;
        let Some(t) = self.target.row else {
            return self.settle(Kind::Nothing);
        };
        let sc = e.deleted.as_ref().and_then(|d| d.column).unwrap_or(0);
        let c = &e.columns[sc];
        let (s, v) = (canon::value(at, c.ty), canon::value(&t[sc], c.ty));
        if s == v {
            let v = Verdict {
                source: self.target.hash,
                ..self.verdict(Kind::SoftDeleted)
            };
            return self.decide(v);
        }
        let columns = vec![ColumnDiff {
            column: c.name.clone(),
            source: shown(&c.name, s),
            target: shown(&c.name, v),
        }];
        let reason = Some("soft-deleted in the source".into());
        let d = RowDiff {
            columns,
            ..self.diff("different", reason)
        };
        let th = self.target.hash;
        self.differ(None, th, d);
    }

    /// A row that must stay out until its reference exists (`why`): absent, and recorded
    /// as a dead letter or pending.
    fn held(self, why: &str) {
        match (self.target.row, self.target.record) {
            (Some(_), _) => {
                let d = self.diff("different", Some(format!("{why}, yet the row is there")));
                let th = self.target.hash;
                self.differ(None, th, d)
            }
            (None, Some(Record::DeadLetter)) => self.settle(Kind::DeadLettered),
            (None, Some(Record::Pending)) => self.settle(Kind::Deferred),
            (None, None) => {
                let why =
                    format!("{why}, and no dead letter or pending entry records the document");
                let d = self.diff("missing", Some(why));
                self.differ(None, None, d)
            }
        }
    }

    /// A row with its child rows (`soft`: marked deleted): the same in the target, counted
    /// apart when recorded as pending or dead, else missing or different in these columns
    /// and child rows.
    fn row(self, row: &[Value], children: &[Vec<Vec<Value>>], soft: bool) {
        let e = self.acc.e;
        let sh = xor(&full_hash(e, row, children));
        let th = self.target.hash;
        let Some(t) = self.target.row else {
            return match self.target.record {
                Some(Record::Pending) => self.settle(Kind::Deferred),
                Some(Record::DeadLetter) => self.settle(Kind::DeadLettered),
                None => {
                    let d = self.diff("missing", None);
                    self.differ(Some(sh), None, d)
                }
            };
        };
        if Some(sh) == th {
            let kind = if soft { Kind::SoftDeleted } else { Kind::Same };
            let v = Verdict {
                source: Some(sh),
                ..self.verdict(kind)
            };
            return self.decide(v);
        }
        let t_children: Vec<Vec<Vec<Value>>> = e
            .children
            .iter()
            .zip(self.target.kids.iter())
            .map(|(c, m)| m.get(&link_of_parent(c, row)).cloned().unwrap_or_default())
            .collect();
        let columns = column_diffs(e.table_ref(), row, t);
        let kids: Vec<ChildDiff> = e
            .children
            .iter()
            .zip(children.iter().zip(&t_children))
            .flat_map(|(c, (s, t))| child_diffs(c, s, t))
            .collect();
        let reason = soft.then(|| "soft-deleted in the source".into());
        let d = RowDiff {
            columns,
            children: kids,
            ..self.diff("different", reason)
        };
        self.differ(Some(sh), th, d);
    }
}
