//! BSON to JSON: the relaxed extended JSON tree of a value, and its compact text in source
//! key order and with keys sorted, written in one pass over the raw bytes.

use super::{sanitize, Value};
use bson::{raw::RawBsonRef, Bson};

fn sanitize_json(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        J::String(s) => J::String(sanitize(&s)),
        J::Array(a) => J::Array(a.into_iter().map(sanitize_json).collect()),
        J::Object(o) => J::Object(
            o.into_iter()
                .map(|(k, v)| (sanitize(&k), sanitize_json(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Deepest nesting converted to JSON. MongoDB itself stores at most 100 levels; deeper
/// values (which other servers may accept) would exhaust the stack of the recursive
/// converters, so they are refused (a dead letter) instead.
pub const MAX_NESTING: usize = 100;

/// Whether `v` nests documents/arrays more than `limit` levels deep (stops at `limit + 1`).
pub fn nested_deeper_than(v: RawBsonRef<'_>, limit: usize) -> bool {
    let children = match v {
        RawBsonRef::Document(d) => d.into_iter().map(|r| r.map(|(_, v)| v)).collect::<Vec<_>>(),
        RawBsonRef::Array(a) => a.into_iter().collect::<Vec<_>>(),
        _ => return false,
    };
    if limit == 0 {
        return true;
    }
    children
        .into_iter()
        .flatten()
        .any(|c| nested_deeper_than(c, limit - 1))
}

/// Relaxed extended JSON of a raw BSON value, NUL-free, in one pass over the raw bytes.
/// The common types are converted here directly; the rare ones (dates, ObjectIds, binary,
/// regexes, decimals, non-finite doubles, …) go through the bson crate's own relaxed
/// extended JSON, one value at a time, so the output is exactly the crate's (a test checks
/// it). Going through `bson::Document` for the whole document cost three allocating passes.
pub fn raw_to_json(v: RawBsonRef<'_>) -> Result<serde_json::Value, String> {
    to_json(v, MAX_NESTING)
}

fn to_json(v: RawBsonRef<'_>, levels_left: usize) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    let too_deep = || {
        format!(
            "value is nested more than {MAX_NESTING} levels deep (MongoDB's own limit); \
             it cannot be converted to JSON"
        )
    };
    let undecodable = |e: bson::raw::Error| format!("undecodable BSON: {e}");
    Ok(match v {
        RawBsonRef::Document(d) => {
            if levels_left == 0 {
                return Err(too_deep());
            }
            let mut m = serde_json::Map::new();
            for el in d {
                let (k, v) = el.map_err(undecodable)?;
                m.insert(sanitize(k), to_json(v, levels_left - 1)?);
            }
            J::Object(m)
        }
        RawBsonRef::Array(a) => {
            if levels_left == 0 {
                return Err(too_deep());
            }
            let mut out = Vec::new();
            for el in a {
                out.push(to_json(el.map_err(undecodable)?, levels_left - 1)?);
            }
            J::Array(out)
        }
        RawBsonRef::String(s) => J::String(sanitize(s)),
        RawBsonRef::Int32(i) => J::from(i),
        RawBsonRef::Int64(i) => J::from(i),
        RawBsonRef::Boolean(b) => J::Bool(b),
        RawBsonRef::Null => J::Null,
        RawBsonRef::Double(f) if f.is_finite() => J::from(f),
        other => {
            let b = Bson::try_from(other).map_err(|e| format!("undecodable BSON: {e}"))?;
            sanitize_json(b.into_relaxed_extjson())
        }
    })
}

/// JSON of a raw BSON value as text, without a tree: [`Value::JsonText`] with the compact
/// text in source key order and the text with keys sorted at every level, each written in
/// one pass over the raw bytes. The bytes are exactly those of [`raw_to_json`] serialized
/// and of its tree rendered sorted (tests check both). Building, walking and freeing the
/// `serde_json` tree was most of the mapper's time on documents with a whole-document
/// JSON column (BENCHMARKS.md). A document that repeats a key (the tree keeps the last
/// value at the first position) and every error take the tree's path, so its rules and
/// messages stay the only ones.
pub fn raw_to_json_text(v: RawBsonRef<'_>) -> Result<Value, String> {
    let mut text = Vec::with_capacity(1024);
    let mut sorted = Vec::with_capacity(1024);
    let mut scratch = Vec::new();
    if !matches!(
        write_dual(v, MAX_NESTING, &mut text, &mut sorted, &mut scratch),
        Ok(true)
    ) {
        return raw_to_json(v).map(Value::Json);
    }
    // The writers copy `&str` slices and ASCII punctuation only.
    let utf8 =
        |b: Vec<u8>| String::from_utf8(b).map_err(|e| format!("JSON text is not UTF-8: {e}"));
    Ok(Value::JsonText {
        text: utf8(text)?,
        sorted: Some(utf8(sorted)?),
    })
}

fn sanitized(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', ""))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    // serde_json's own string escaping, so the text matches a serialized tree.
    serde_json::to_writer(out, s).expect("JSON into memory");
}

/// One member of a document being written by [`write_dual`]: its key, the range of its
/// escaped key in `text`, the range of its value in `sorted` (from the document's start).
type Member<'a> = (std::borrow::Cow<'a, str>, (usize, usize), (usize, usize));

/// Writes `v` as compact JSON twice in one walk: to `text` in source order and to `sorted`
/// with keys sorted. A document's members are first rendered to `sorted` in source order,
/// then moved into key order through `scratch` (members are finished, so one scratch
/// buffer serves every level). Ok(false) when a document repeats a key.
fn write_dual(
    v: RawBsonRef<'_>,
    levels_left: usize,
    text: &mut Vec<u8>,
    sorted: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Result<bool, String> {
    let undecodable = |e: bson::raw::Error| format!("undecodable BSON: {e}");
    match v {
        RawBsonRef::Document(d) => {
            if levels_left == 0 {
                return Err("too deep".into());
            }
            text.push(b'{');
            let base = sorted.len();
            // Per member: its key, where its escaped key lies in `text`, and where its value
            // lies in `sorted` (relative to `base`). Keys are escaped once, into `text`, and
            // copied from there; a level whose keys already come in order is written to
            // `sorted` in place, without the round trip through `scratch`.
            let mut members: Vec<Member<'_>> = Vec::new();
            let mut in_order = true;
            sorted.push(b'{');
            for (n, el) in d.into_iter().enumerate() {
                let (k, v) = el.map_err(undecodable)?;
                let k = sanitized(k);
                if n > 0 {
                    text.push(b',');
                    sorted.push(b',');
                }
                let key_start = text.len();
                write_str(&k, text);
                let key = (key_start, text.len());
                sorted.extend_from_slice(&text[key.0..key.1]);
                text.push(b':');
                sorted.push(b':');
                let start = sorted.len();
                if !write_dual(v, levels_left - 1, text, sorted, scratch)? {
                    return Ok(false);
                }
                if let Some(last) = members.last() {
                    in_order &= last.0 < k;
                }
                members.push((k, key, (start - base, sorted.len() - base)));
            }
            text.push(b'}');
            sorted.push(b'}');
            if in_order {
                // Strictly increasing keys: sorted already, and no key repeats.
                return Ok(true);
            }
            members.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            if members.windows(2).any(|w| w[0].0 == w[1].0) {
                return Ok(false);
            }
            scratch.clear();
            scratch.extend_from_slice(&sorted[base..]);
            sorted.truncate(base);
            sorted.push(b'{');
            for (n, (_, key, (start, end))) in members.iter().enumerate() {
                if n > 0 {
                    sorted.push(b',');
                }
                sorted.extend_from_slice(&text[key.0..key.1]);
                sorted.push(b':');
                sorted.extend_from_slice(&scratch[*start..*end]);
            }
            sorted.push(b'}');
        }
        RawBsonRef::Array(a) => {
            if levels_left == 0 {
                return Err("too deep".into());
            }
            text.push(b'[');
            sorted.push(b'[');
            for (n, el) in a.into_iter().enumerate() {
                if n > 0 {
                    text.push(b',');
                    sorted.push(b',');
                }
                let el = el.map_err(undecodable)?;
                if !write_dual(el, levels_left - 1, text, sorted, scratch)? {
                    return Ok(false);
                }
            }
            text.push(b']');
            sorted.push(b']');
        }
        scalar => {
            let start = text.len();
            match scalar {
                RawBsonRef::String(s) => write_str(&sanitized(s), text),
                RawBsonRef::Int32(i) => {
                    text.extend_from_slice(itoa::Buffer::new().format(i).as_bytes())
                }
                RawBsonRef::Int64(i) => {
                    text.extend_from_slice(itoa::Buffer::new().format(i).as_bytes())
                }
                RawBsonRef::Boolean(b) => {
                    text.extend_from_slice(if b { b"true" } else { b"false" })
                }
                RawBsonRef::Null => text.extend_from_slice(b"null"),
                RawBsonRef::Double(f) if f.is_finite() => {
                    serde_json::to_writer(&mut *text, &f).expect("JSON into memory")
                }
                other => {
                    // Rare types: the bson crate's relaxed extended JSON of this one value.
                    let j = to_json(other, levels_left)?;
                    serde_json::to_writer(&mut *text, &j).expect("JSON into memory");
                    write_sorted_json(&j, sorted);
                    return Ok(true);
                }
            }
            sorted.extend_from_slice(&text[start..]);
        }
    }
    Ok(true)
}

/// Compact JSON of a tree with object keys sorted at every level.
pub fn write_sorted_json(j: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value as J;
    match j {
        J::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            out.push(b'{');
            for (n, k) in keys.into_iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                write_str(k, out);
                out.push(b':');
                write_sorted_json(&o[k], out);
            }
            out.push(b'}');
        }
        J::Array(a) => {
            out.push(b'[');
            for (n, v) in a.iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                write_sorted_json(v, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("JSON into memory"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_beyond_the_limit_is_an_error_not_a_stack_overflow() {
        let nest = |levels: usize| {
            let v = (0..levels).fold(Bson::Int32(1), |v, _| Bson::Array(vec![v]));
            bson::RawDocumentBuf::from_document(&bson::doc! { "v": v }).unwrap()
        };
        let ok = nest(MAX_NESTING);
        assert!(raw_to_json(ok.get("v").unwrap().unwrap()).is_ok());
        let deep = nest(MAX_NESTING + 1);
        let err = raw_to_json(deep.get("v").unwrap().unwrap()).unwrap_err();
        assert!(err.contains("nested"), "{err}");
        let very = nest(150);
        assert!(raw_to_json(very.get("v").unwrap().unwrap()).is_err());
    }

    #[test]
    fn one_pass_json_is_the_bson_crates_relaxed_extended_json() {
        let d = bson::doc! {
            "s": "a\u{0}b", "i": 1i32, "l": 1i64 << 40, "d": 1.5, "whole": 2.0, "nan": f64::NAN,
            "inf": f64::NEG_INFINITY, "b": true, "n": Bson::Null, "date": bson::DateTime::from_millis(1_600_000_000_123),
            "old": bson::DateTime::from_millis(-1), "oid": bson::oid::ObjectId::from_bytes([7; 12]),
            "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2] },
            "re": bson::Regex { pattern: "x".into(), options: "mi".into() },
            "dec": Bson::Decimal128(bson::Decimal128::from_bytes([1; 16])),
            "ts": bson::Timestamp { time: 1, increment: 2 }, "min": Bson::MinKey, "max": Bson::MaxKey,
            "undef": Bson::Undefined, "key": { "nested": [1, { "x": [] }, "y"] }, "empty": {},
        };
        let raw = bson::RawDocumentBuf::from_document(&d).unwrap();
        let old = sanitize_json(Bson::Document(d).into_relaxed_extjson());
        let new = raw_to_json(RawBsonRef::Document(&raw)).unwrap();
        assert_eq!(new.to_string(), old.to_string());
    }

    /// The one-pass text writer gives exactly the tree's bytes, in source order and sorted.
    fn assert_text_matches_tree(raw: &bson::RawDocument) {
        let v = RawBsonRef::Document(raw);
        let tree = raw_to_json(v).unwrap();
        let mut sorted_tree = Vec::new();
        write_sorted_json(&tree, &mut sorted_tree);
        match raw_to_json_text(v).unwrap() {
            Value::JsonText { text, sorted } => {
                assert_eq!(text, tree.to_string());
                assert_eq!(sorted.unwrap().as_bytes(), &sorted_tree[..]);
            }
            Value::Json(j) => assert_eq!(j, tree, "fallback must be the tree"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn one_pass_text_is_the_trees_text_sorted_and_unsorted() {
        let d = bson::doc! {
            "zeta": "a\u{0}b\"\\\n\u{1}é😀", "i": -1i32, "l": i64::MIN, "d": 1.5, "whole": 2.0, "tiny": 1e-300,
            "nan": f64::NAN, "inf": f64::NEG_INFINITY, "b": false, "n": Bson::Null,
            "date": bson::DateTime::from_millis(1_600_000_000_123), "oid": bson::oid::ObjectId::from_bytes([7; 12]),
            "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2] },
            "re": bson::Regex { pattern: "x".into(), options: "mi".into() },
            "dec": Bson::Decimal128(bson::Decimal128::from_bytes([1; 16])),
            "ts": bson::Timestamp { time: 1, increment: 2 }, "min": Bson::MinKey, "undef": Bson::Undefined,
            "key": { "nested": [1, { "y": [], "x": { "b": 1, "a\u{e9}": 2, "A": 3, "a": 4 } }, "y"] }, "empty": {}, "arr": [],
            "upvotes": [{ "userId": "u1", "timestamp": 1_600_000_000i64 }, { "timestamp": 3, "userId": "u2" }],
        };
        assert_text_matches_tree(&bson::RawDocumentBuf::from_document(&d).unwrap());
        // Levels whose keys already come in order (written in place) around ones that do not.
        let ordered = bson::doc! {
            "a": 1, "b": { "d": 1, "c": { "e": 2, "f": [{ "y": 1, "x": 2 }] } }, "c": [{ "x": 1 }, {}], "é": "z",
        };
        assert_text_matches_tree(&bson::RawDocumentBuf::from_document(&ordered).unwrap());
        for keys in [["a", "a"], ["a", "b"], ["b", "a"]] {
            let mut inner = bson::RawDocumentBuf::new();
            inner.append(keys[0], 1);
            inner.append(keys[1], 2);
            let mut outer = bson::RawDocumentBuf::new();
            outer.append("a", 0);
            outer.append("in", inner);
            let repeats = keys[0] == keys[1];
            assert_eq!(
                matches!(
                    raw_to_json_text(RawBsonRef::Document(&outer)).unwrap(),
                    Value::Json(_)
                ),
                repeats,
                "{keys:?}: a repeated key, even in order, takes the tree's path"
            );
            assert_text_matches_tree(&outer);
        }
        // Raw BSON may repeat a key (BSON keys cannot hold NUL, so sanitizing never merges two).
        let mut repeated = bson::RawDocumentBuf::new();
        repeated.append("k", 1);
        repeated.append("j", "x");
        repeated.append("k", 2);
        let v = RawBsonRef::Document(&repeated);
        assert!(
            matches!(raw_to_json_text(v).unwrap(), Value::Json(_)),
            "the tree decides"
        );
        assert_text_matches_tree(&repeated);
    }

    #[test]
    fn one_pass_text_errors_are_the_trees_errors() {
        fn nest(n: usize) -> bson::Document {
            let mut v = Bson::Int32(1);
            for _ in 0..n {
                v = Bson::Document(bson::doc! { "a": v });
            }
            bson::doc! { "v": v }
        }
        let deep = bson::RawDocumentBuf::from_document(&nest(MAX_NESTING + 1)).unwrap();
        let v = deep.get("v").unwrap().unwrap();
        assert_eq!(
            raw_to_json_text(v).unwrap_err(),
            raw_to_json(v).unwrap_err()
        );
    }
}
