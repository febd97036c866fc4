//! Building window queries in the time field's own encoding, so the
//! `(time_field, _id)` index serves both the range and the keyset.

use super::Position;
use crate::mapping::spec::TimeEncoding;
use crate::span::{fmt_ts, Window};
use bson::{doc, Bson, Document};
use chrono::{DateTime, Utc};

/// A window bound in the same BSON encoding the documents use.
pub fn encode_bound(t: DateTime<Utc>, enc: TimeEncoding) -> Bson {
    let ms = t.timestamp_millis();
    match enc {
        TimeEncoding::Date => Bson::DateTime(bson::DateTime::from_millis(ms)),
        TimeEncoding::EpochMillis => Bson::Int64(ms),
        TimeEncoding::EpochSeconds if ms % 1000 == 0 => Bson::Int64(ms / 1000),
        TimeEncoding::EpochSeconds => Bson::Double(ms as f64 / 1000.0),
        TimeEncoding::Iso8601 => Bson::String(fmt_ts(t)),
    }
}

/// `filter AND from <= t < to`, continuing strictly after `after` in `(t, _id)` order.
pub fn window_filter(
    extra: &Document,
    time_field: &str,
    enc: TimeEncoding,
    w: &Window,
    after: Option<&Position>,
) -> Document {
    let lo = encode_bound(w.from, enc);
    let hi = encode_bound(w.to, enc);
    // One flat query document when the entity filter allows it: some servers (SecantusDB)
    // only derive tight index bounds from a top-level range, not from inside `$and`
    // (measured: 700 ms -> 9 ms per window).
    if !extra.contains_key(time_field) && !extra.contains_key("$or") {
        let mut d = extra.clone();
        match after {
            None => {
                d.insert(time_field, doc! { "$gte": lo, "$lt": hi });
            }
            Some(p) => {
                d.insert(time_field, doc! { "$gte": p.ts.clone(), "$lt": hi });
                let mut or = vec![
                    Bson::Document(doc! { time_field: { "$gt": p.ts.clone() } }),
                    Bson::Document(doc! { "_id": { "$gt": p.id.clone() } }),
                ];
                let later = later_type_codes(&p.id);
                if !later.is_empty() {
                    or.push(Bson::Document(doc! { "_id": { "$type": later } }));
                }
                d.insert("$or", or);
            }
        }
        return d;
    }
    let mut clauses: Vec<Bson> = Vec::new();
    if !extra.is_empty() {
        clauses.push(Bson::Document(extra.clone()));
    }
    match after {
        None => clauses.push(Bson::Document(
            doc! { time_field: { "$gte": lo, "$lt": hi } },
        )),
        Some(p) => {
            // Keyset: t > ts, or t == ts and _id > id. Written as a range on t plus an $or so the
            // compound index bounds stay tight.
            clauses.push(Bson::Document(
                doc! { time_field: { "$gte": lo, "$lt": hi.clone() } },
            ));
            clauses.push(Bson::Document(
                doc! { time_field: { "$gte": p.ts.clone(), "$lt": hi } },
            ));
            // `$gt` only matches values of the same type class (type bracketing), while the
            // sort orders `_id`s of different types by class: the ids of every later class
            // must be named explicitly, or a resume between two classes would skip them.
            let mut or = vec![
                Bson::Document(doc! { time_field: { "$gt": p.ts.clone() } }),
                Bson::Document(doc! { "_id": { "$gt": p.id.clone() } }),
            ];
            let later = later_type_codes(&p.id);
            if !later.is_empty() {
                or.push(Bson::Document(doc! { "_id": { "$type": later } }));
            }
            clauses.push(Bson::Document(doc! { "$or": or }));
        }
    }
    if clauses.len() == 1 {
        match clauses.pop() {
            Some(Bson::Document(d)) => d,
            _ => unreachable!(),
        }
    } else {
        doc! { "$and": clauses }
    }
}

/// MongoDB's sort order across BSON types: `(numeric $type code, class rank)`. Types of one
/// class (the numbers; string and symbol) compare by value, classes by rank.
const TYPE_CLASSES: &[(i32, u8)] = &[
    (-1, 0),   // minKey
    (6, 1),    // undefined
    (10, 2),   // null
    (1, 3),    // double
    (16, 3),   // int
    (18, 3),   // long
    (19, 3),   // decimal
    (2, 4),    // string
    (14, 4),   // symbol
    (3, 5),    // object
    (4, 6),    // array
    (5, 7),    // binData
    (7, 8),    // objectId
    (8, 9),    // bool
    (9, 10),   // date
    (17, 11),  // timestamp
    (11, 12),  // regex
    (12, 13),  // dbPointer
    (13, 14),  // javascript
    (15, 15),  // javascriptWithScope
    (127, 16), // maxKey
];

/// The `$type` codes of every class sorting after `v`'s class (all codes if unknown).
pub fn later_type_codes(v: &Bson) -> Vec<i32> {
    let code = v.element_type() as i32;
    let code = if code == 0xFF { -1 } else { code };
    let rank = TYPE_CLASSES
        .iter()
        .find(|(c, _)| *c == code)
        .map_or(0, |(_, r)| *r);
    TYPE_CLASSES
        .iter()
        .filter(|(_, r)| *r > rank)
        .map(|(c, _)| *c)
        .collect()
}

/// Documents whose time field no window can select: missing or null, or of a type other
/// than the encoding's. Each wrong type is one range predicate (`$gte` the smallest value of
/// that type: MongoDB compares within a type only), so the `(time, _id)` index answers the
/// query with a few short index ranges instead of a collection scan (a `$type` test would
/// scan every document, on every run). Arrays are indexed by their elements, so an array
/// holding a wrong-typed element is found by that element's range, and `[]` by equality.
/// Not looked for: BSON timestamps (an internal type applications do not store, whose range
/// SecantusDB cannot serve from the index) and arrays whose elements all have the right type
/// (windows select those by their elements; mapping the time column then dead-letters them).
/// The first and the last instant a window can hold: the years 1 to 9999 (what every
/// column and encoding can represent, ISO-8601 strings included); a value of the right type
/// outside them is invalid.
pub fn readable_range() -> (DateTime<Utc>, DateTime<Utc>) {
    use chrono::TimeZone;
    (
        Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(),
        Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap()
            + chrono::TimeDelta::milliseconds(999),
    )
}

pub fn invalid_time_filter(extra: &Document, time_field: &str, enc: TimeEncoding) -> Document {
    let numbers = [
        doc! { time_field: { "$gte": f64::NEG_INFINITY } },
        doc! { time_field: f64::NAN },
    ];
    let strings = doc! { time_field: { "$gte": "" } };
    let dates = doc! { time_field: { "$gte": bson::DateTime::MIN } };
    let mut any = vec![
        doc! { time_field: null },
        doc! { time_field: { "$gte": {} } },
        doc! { time_field: { "$gte": bson::oid::ObjectId::from_bytes([0; 12]) } },
        doc! { time_field: { "$in": [true, false] } },
        doc! { time_field: [] },
    ];
    // Values of the right type that no window can hold (beyond the years 1-9999, e.g.
    // epoch milliseconds of ±2^62): never read by a window, so the scan must find them.
    let (first, last) = readable_range();
    let (lo, hi) = (first.timestamp_millis(), last.timestamp_millis());
    match enc {
        TimeEncoding::Date => {
            any.extend(numbers);
            any.push(strings);
            any.push(doc! { time_field: { "$lt": bson::DateTime::from_millis(lo), "$gte": bson::DateTime::MIN } });
            any.push(doc! { time_field: { "$gt": bson::DateTime::from_millis(hi) } });
        }
        TimeEncoding::EpochSeconds | TimeEncoding::EpochMillis => {
            any.push(strings);
            any.push(dates);
            let (lo, hi) = if enc == TimeEncoding::EpochSeconds {
                (lo / 1000, hi / 1000)
            } else {
                (lo, hi)
            };
            any.push(doc! { time_field: { "$lt": lo as f64, "$gte": f64::NEG_INFINITY } });
            any.push(doc! { time_field: { "$gt": hi as f64 } });
        }
        TimeEncoding::Iso8601 => {
            any.extend(numbers);
            any.push(dates);
        }
    }
    let bad = doc! { "$or": any };
    if extra.is_empty() {
        bad
    } else {
        doc! { "$and": [extra.clone(), bad] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn bounds_use_the_field_encoding() {
        let t = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            encode_bound(t, TimeEncoding::EpochSeconds),
            Bson::Int64(1_577_836_800)
        );
        assert_eq!(
            encode_bound(t, TimeEncoding::EpochMillis),
            Bson::Int64(1_577_836_800_000)
        );
        assert_eq!(
            encode_bound(t, TimeEncoding::Iso8601),
            Bson::String("2020-01-01T00:00:00.000Z".into())
        );
        let t2 = t + chrono::TimeDelta::milliseconds(500);
        assert_eq!(
            encode_bound(t2, TimeEncoding::EpochSeconds),
            Bson::Double(1_577_836_800.5)
        );
    }

    #[test]
    fn keyset_names_every_later_id_type_class() {
        // A number sorts before strings, objects, ObjectIds, booleans, dates, ...
        let after_int = later_type_codes(&Bson::Int32(5));
        for code in [2, 14, 3, 5, 7, 8, 9, 17, 127] {
            assert!(after_int.contains(&code), "{code} missing: {after_int:?}");
        }
        for same in [1, 16, 18, 19, 10, -1] {
            assert!(
                !after_int.contains(&same),
                "{same} is not later than a number"
            );
        }
        // ObjectId: booleans, dates and later, never numbers or strings.
        let after_oid = later_type_codes(&Bson::ObjectId(bson::oid::ObjectId::new()));
        assert!(after_oid.contains(&8) && after_oid.contains(&9) && !after_oid.contains(&2));
        assert!(later_type_codes(&Bson::MaxKey).is_empty());
        assert_eq!(
            later_type_codes(&Bson::MinKey).len(),
            TYPE_CLASSES.len() - 1
        );
    }

    #[test]
    fn keyset_filter_continues_after_position() {
        let w = Window::new(
            Utc.timestamp_opt(0, 0).unwrap(),
            Utc.timestamp_opt(100, 0).unwrap(),
        );
        let p = Position {
            ts: Bson::Int64(50),
            id: Bson::Int32(7),
        };
        let f = window_filter(
            &Document::new(),
            "t",
            TimeEncoding::EpochSeconds,
            &w,
            Some(&p),
        );
        let s = f.to_string();
        assert!(
            s.contains("\"$gt\": 50") && s.contains("\"_id\": { \"$gt\": 7 }"),
            "{s}"
        );
    }
}
