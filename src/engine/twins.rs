//! Ids that differ only in BSON type (`42` and `"42"`, an ObjectId and its hex string)
//! become the same key text: the string keeps the key and the other document is
//! dead-lettered (docs/MAPPING.md, "How ids of different BSON types are keyed"). For each
//! page, the documents' possible twins are looked up in the source with one `$in` query,
//! so the verdict does not depend on which of the two was read first, nor on pages.

use crate::engine::page::{raw_json, source_id};
use crate::mapping::{lookup, Entity};
use crate::sink::DeadLetter;
use crate::source::Source;
use anyhow::Result;
use bson::raw::RawBsonRef;
use bson::{Bson, RawDocumentBuf};
use std::collections::{HashMap, HashSet};

/// The verdict for one page.
#[derive(Debug, Default)]
pub struct Twins {
    /// Documents of the page that lose their key to a string twin (by source id), with
    /// the error.
    pub losers: HashMap<String, String>,
    /// Typed twins outside the page that lose the key to a string of the page, with that
    /// key (they may have been written before the string arrived: the string's row
    /// replaces theirs, and if the string makes no row, theirs is deleted).
    pub outside: Vec<(Vec<crate::mapping::Value>, DeadLetter)>,
}

fn id_of<'a>(e: &Entity, doc: &'a RawDocumentBuf) -> Option<RawBsonRef<'a>> {
    let path: Vec<String> = e.id_field.split('.').map(str::to_owned).collect();
    lookup(doc, &path).ok().flatten()
}

/// The key text the document maps to, when its key is its id (one key column).
fn key_text(e: &Entity, doc: &RawDocumentBuf) -> Option<String> {
    e.key_of(doc)
        .and_then(|k| k.into_iter().next())
        .map(|v| v.key_text())
}

/// Values of other BSON types whose key text may equal `key` (a superset: found twins are
/// checked by their real key).
fn candidates(id: RawBsonRef<'_>, key: &str) -> Vec<Bson> {
    match id {
        RawBsonRef::String(s) => {
            let mut out = Vec::new();
            if let Ok(i) = s.parse::<i64>() {
                out.push(Bson::Int64(i));
                if let Ok(i) = i32::try_from(i) {
                    out.push(Bson::Int32(i));
                }
                out.push(Bson::Double(i as f64));
            } else if let Ok(f) = s.parse::<f64>() {
                if f.is_finite() {
                    out.push(Bson::Double(f));
                }
            }
            if let Ok(o) = bson::oid::ObjectId::parse_str(s) {
                out.push(Bson::ObjectId(o));
            }
            out
        }
        _ => vec![Bson::String(key.to_owned())],
    }
}

fn type_name(v: RawBsonRef<'_>) -> String {
    format!("{:?}", v.element_type()).to_lowercase()
}

fn shown(v: RawBsonRef<'_>) -> String {
    Bson::try_from(v)
        .map(|b| b.into_relaxed_extjson().to_string())
        .unwrap_or_else(|_| "<undecodable>".into())
}

fn message(e: &Entity, loser: RawBsonRef<'_>, winner: RawBsonRef<'_>, key: &str) -> String {
    format!(
        "id {} ({}) collides with id {} ({}) of another document: both become key `{key}` of table {}. \
         The string keeps the key and this document is dead-lettered (docs/MAPPING.md, how ids of \
         different BSON types are keyed); give one of them another id, or key the table by a column \
         that tells them apart",
        shown(loser),
        type_name(loser),
        shown(winner),
        type_name(winner),
        e.table
    )
}

/// Look up the twins of the page's documents and decide who keeps each key.
pub async fn find(source: &Source, e: &Entity, docs: &[RawDocumentBuf]) -> Result<Twins> {
    let mut out = Twins::default();
    // Only where the table's key is the id itself; other keys are the mapping's choice.
    if e.key_column.is_none_or(|kc| e.pk != [kc]) || docs.is_empty() {
        return Ok(out);
    }
    let mut keys: Vec<Option<(String, bool)>> = Vec::with_capacity(docs.len());
    let mut values = Vec::new();
    let mut seen = HashSet::new();
    for doc in docs {
        let (Some(id), Some(key)) = (id_of(e, doc), key_text(e, doc)) else {
            keys.push(None);
            continue;
        };
        let is_string = matches!(id, RawBsonRef::String(_));
        for c in candidates(id, &key) {
            if seen.insert(c.to_string()) {
                values.push(c);
            }
        }
        keys.push(Some((key, is_string)));
    }
    if values.is_empty() {
        return Ok(out);
    }
    let found = source.fetch_in(e, &e.id_field, values).await?;
    if found.is_empty() {
        return Ok(out);
    }
    let page_ids: HashSet<String> = docs.iter().map(|d| source_id(d)).collect();
    // key text → twins of each kind found in the source.
    let mut strings: HashMap<String, &RawDocumentBuf> = HashMap::new();
    let mut typed: HashMap<String, Vec<&RawDocumentBuf>> = HashMap::new();
    for t in &found {
        let (Some(id), Some(key)) = (id_of(e, t), key_text(e, t)) else {
            continue;
        };
        if matches!(id, RawBsonRef::String(_)) {
            strings.insert(key, t);
        } else {
            typed.entry(key).or_default().push(t);
        }
    }
    let mut outside_seen = HashSet::new();
    for (i, k) in keys.iter().enumerate() {
        let Some((key, is_string)) = k else { continue };
        let id = id_of(e, &docs[i]).expect("read above");
        if !is_string {
            if let Some(w) = strings.get(key) {
                let winner = id_of(e, w).expect("read above");
                out.losers
                    .insert(source_id(&docs[i]), message(e, id, winner, key));
            }
        } else {
            for t in typed.get(key).into_iter().flatten() {
                let sid = source_id(t);
                if page_ids.contains(&sid) || !outside_seen.insert(sid.clone()) {
                    continue;
                }
                let (Some(k), Some(loser)) = (e.key_of(t), id_of(e, t)) else {
                    continue;
                };
                let dead = DeadLetter {
                    source_id: sid,
                    error: message(e, loser, id, key),
                    document: raw_json(t),
                };
                out.outside.push((k, dead));
            }
        }
    }
    Ok(out)
}
