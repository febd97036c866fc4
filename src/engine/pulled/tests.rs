//! Unit tests of the pulled set: against a plain map, through merges, spills and
//! look-aheads.

use super::shard::{Shard, MERGE_AT};
use super::spill::BLOCK;
use super::*;

#[test]
fn a_key_is_skipped_only_for_the_same_document_and_forgotten_otherwise() {
    let mut p = Pulled::default();
    p.record(&[(1, 10), (2, 20)]);
    assert!(p.take_same(1, 10));
    // Still there: the same document read twice is still the row in the target.
    assert!(p.take_same(1, 10));
    // Another document for key 2: written, and key 2 is forgotten for the rest of the run.
    assert!(!p.take_same(2, 21));
    assert!(!p.take_same(2, 20));
    assert!(!p.take_same(3, 30));
    p.forget(1);
    assert!(!p.take_same(1, 10));
    assert!(p.is_empty());
}

/// A xorshift64 generator: the same keys every run.
fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Up to `n` random keys, no two in one slot (so the set answers exactly as a map).
fn one_per_slot(next: &mut impl FnMut() -> u64, n: usize) -> Vec<u64> {
    let mut slots = std::collections::HashSet::new();
    (0..n)
        .map(|_| next())
        .filter(|&k| slots.insert(place(k)))
        .collect()
}

/// A set that spills every `spill_at` keys, under the system's temporary directory.
fn spilling(spill_at: usize, capacity: usize) -> Pulled {
    Pulled {
        spill_at,
        capacity,
        ..Pulled::default()
    }
}

#[test]
fn the_set_stops_growing_at_capacity_but_updates_known_keys() {
    for spill_at in [usize::MAX, 64] {
        let cap = 1000;
        let mut p = spilling(spill_at, cap);
        let many: Vec<Fresh> = (0..cap as u64 + 10).map(|k| (k << 32 | k, k)).collect();
        p.record(&many);
        assert_eq!(p.len(), cap);
        let (k, d) = many[cap + 5];
        assert!(!p.take_same(k, d));
        p.record(&[(many[7].0, 99)]);
        assert!(p.take_same(many[7].0, 99));
        assert!(!p.take_same(many[7].0, 7));
        assert_eq!(p.len(), cap - 1);
        assert_eq!(p.spill.is_some(), spill_at == 64);
    }
}

#[test]
fn at_capacity_a_spilled_key_recorded_again_is_updated_in_the_file() {
    let mut p = spilling(4, 8);
    let keys: Vec<Fresh> = (1..=8u64).map(|k| (k << 32 | k, k)).collect();
    p.record(&keys);
    assert!(p.spill.is_some() && p.mem == 0, "all spilled");
    assert!(p.same(keys[2].0, 3));
    // Full: a new version of key 3 replaces the older one where it is, in the file.
    p.record(&[(keys[2].0, 333)]);
    assert!(!p.same(keys[2].0, 3));
    assert!(p.same(keys[2].0, 333));
    // A key the set does not hold is not taken.
    p.record(&[(9 << 32 | 9, 9)]);
    assert!(!p.same(9 << 32 | 9, 9));
    assert_eq!(p.len(), 8);
}

#[test]
fn a_spilled_key_recorded_again_is_skipped_only_for_its_newest_document() {
    let k = 0x0000_0003_0000_0042u64;
    let mut p = spilling(1, CAPACITY);
    p.record(&[(k, 10)]);
    assert!(p.spill.is_some(), "spilled at once");
    assert!(p.same(k, 10));
    p.spill_at = 2;
    p.record(&[(k, 20)]);
    assert_eq!(
        p.mem, 1,
        "the newer version is in memory, the older in the file"
    );
    assert!(!p.same(k, 10));
    assert!(p.same(k, 20));
    p.record(&[(k + 1, 30)]);
    assert_eq!(
        p.mem, 0,
        "spilled again, the newer version replacing the older"
    );
    assert_eq!(p.spill.as_ref().unwrap().live, 2);
    assert!(!p.same(k, 10));
    assert!(p.take_same(k, 20));
    p.forget(k);
    assert!(!p.take_same(k, 20));
    assert!(!p.take_same(k + 1, 31), "another document: forgotten");
    assert!(p.is_empty());
}

#[test]
fn a_look_ahead_is_confirmed_from_memory_unless_its_key_was_forgotten() {
    let k = 0x0000_0001_0000_0007u64;
    let mut p = spilling(1, CAPACITY);
    p.record(&[(k, 5)]);
    assert!(p.same(k, 5));
    assert_eq!(p.spill.as_ref().unwrap().looked.len(), 1);
    assert!(p.take_same(k, 5));
    assert!(p.spill.as_ref().unwrap().looked.is_empty(), "consumed");
    assert!(p.same(k, 5));
    p.forget(k);
    assert!(!p.take_same(k, 5), "the look ahead did not outlive the key");
}

#[test]
fn the_set_spills_under_the_temporary_directory_when_the_state_directory_fails() {
    let mut p = Pulled {
        spill_at: 2,
        ..Pulled::new("/nonexistent/tidemark-state")
    };
    p.record(&[(1, 1), (2 << 32, 2)]);
    assert!(p.spill.is_some());
    assert_eq!(p.dir.as_deref(), Some(std::env::temp_dir().as_path()));
    assert!(p.same(1, 1) && p.same(2 << 32, 2));
}

/// Many keys through spills, merges, updates, forgets, look-aheads and lookups, against a
/// plain hash map: the set answers as if it had never left memory.
#[test]
fn a_spilling_set_behaves_as_a_map() {
    let mut p = spilling(700, CAPACITY);
    let mut model: std::collections::HashMap<u64, u64> = Default::default();
    let mut next = xorshift(0x9E37_79B9_7F4A_7C15);
    let keys = one_per_slot(&mut next, 5000);
    let mut spills = 0;
    for round in 0..200_000u64 {
        let k = keys[(next() % keys.len() as u64) as usize];
        let d = next() % 3 + 1;
        let entries = p.spill.as_ref().map(|s| s.entries);
        match next() % 5 {
            0 | 1 => {
                let batch: Vec<Fresh> = (0..next() % 8)
                    .map(|_| (keys[(next() % keys.len() as u64) as usize], next() % 3 + 1))
                    .chain([(k, d)])
                    .collect();
                p.record(&batch);
                for (k, d) in batch {
                    model.insert(k, d);
                }
            }
            2 => {
                let want = model.get(&k) == Some(&d);
                assert_eq!(p.take_same(k, d), want, "take_same at round {round}");
                if !want {
                    model.remove(&k);
                }
            }
            3 => assert_eq!(p.same(k, d), model.get(&k) == Some(&d), "round {round}"),
            _ => {
                p.forget(k);
                model.remove(&k);
            }
        }
        if p.spill.as_ref().map(|s| s.entries) != entries {
            spills += 1;
        }
        assert!(p.mem < 700);
        assert!(p.len() >= model.len());
        assert_eq!(p.is_empty(), model.is_empty());
    }
    assert!(spills > 20, "{spills} spills");
    for &k in &keys {
        for d in 1..=3 {
            assert_eq!(p.same(k, d), model.get(&k) == Some(&d));
        }
    }
    let spill = p.spill.as_ref().unwrap();
    assert_eq!(spill.fences.len(), spill.entries.div_ceil(BLOCK));
}

#[test]
fn keys_spread_over_the_shards_are_counted_once() {
    let mut p = Pulled::default();
    let keys: Vec<Fresh> = (0..1000u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15), i))
        .collect();
    p.record(&keys);
    p.record(&keys[..5]);
    assert_eq!(p.len(), 1000);
    assert!(
        p.shards
            .iter()
            .filter(|s| !s.recent.is_empty() || !s.tags.is_empty())
            .count()
            > SHARDS / 2
    );
    assert!(keys[..10].iter().all(|&(k, d)| p.take_same(k, d)));
    assert!(!p.take_same(keys[10].0, 999_999));
    p.forget(keys[11].0);
    p.forget(keys[11].0);
    assert_eq!(p.len(), 998);
    assert!(!p.take_same(keys[11].0, keys[11].1));
}

/// Many keys through merges, updates, forgets and lookups, against a plain hash map.
#[test]
fn the_set_behaves_as_a_map_across_merges() {
    let mut p = spilling(usize::MAX, CAPACITY);
    let mut model: std::collections::HashMap<u64, u64> = Default::default();
    // Few distinct keys per shard, so updates, forgets and lookups hit stored keys; one key
    // per slot, so the map is exact (shared slots: the test below).
    let mut next = xorshift(0x2545_F491_4F6C_DD1D);
    let keys = one_per_slot(&mut next, SHARDS * MERGE_AT * 3);
    for round in 0..600_000u64 {
        let k = keys[(next() % keys.len() as u64) as usize];
        let d = next() % 4; // includes 0, stored as 1 (and so equal to 1)
        match next() % 4 {
            0 | 1 => {
                p.record(&[(k, d)]);
                model.insert(k, d.max(1));
            }
            2 => {
                let got = p.take_same(k, d);
                let want = model.get(&k) == Some(&d.max(1));
                assert_eq!(got, want, "take_same at round {round}");
                if !want {
                    model.remove(&k);
                }
            }
            _ => {
                p.forget(k);
                model.remove(&k);
            }
        }
        assert_eq!(p.same(k, d), model.get(&k) == Some(&d.max(1)));
        assert_eq!(p.len(), model.len(), "round {round}");
    }
    assert!(
        p.shards.iter().all(|s| !s.tags.is_empty()),
        "merges happened"
    );
    for (&k, &d) in &model {
        assert!(p.same(k, d));
    }
}

/// Two keys whose hashes name one slot (same shard bits, same low 32 bits) share it: each
/// may lose its skip, neither is skipped for a document it was not recorded with.
#[test]
fn keys_sharing_a_slot_only_lose_their_skip() {
    let a = 0x0000_0005_1234_5678u64;
    let b = 0x1000_0005_1234_5678u64;
    assert_eq!(place(a), place(b));
    for merged in [false, true] {
        let mut p = Pulled::default();
        p.record(&[(a, 10)]);
        if merged {
            p.shards[place(a).0].merge();
        }
        p.record(&[(b, 20)]);
        assert_eq!(p.len(), 1, "one slot");
        assert!(!p.same(a, 10), "a lost its skip, merged {merged}");
        assert!(!p.take_same(a, 10), "and is forgotten, merged {merged}");
        assert!(
            !p.take_same(b, 20),
            "forgetting a forgot b, merged {merged}"
        );
        assert!(p.is_empty());
    }
}

#[test]
fn a_merged_shard_holds_exactly_its_live_keys() {
    let mut s = Shard::default();
    for k in 0..(MERGE_AT as u32 * 2 + 10) {
        assert!(s.insert(k * 7, u64::from(k) + 1));
    }
    assert!(s.remove(7));
    assert!(!s.remove(7));
    assert!(!s.insert(14, 99), "an update, not a new key");
    s.merge();
    assert!(s.recent.is_empty());
    assert_eq!(s.tags.len(), MERGE_AT * 2 + 9);
    assert_eq!(s.docs.len(), s.tags.len());
    assert_eq!(s.tags.capacity(), s.tags.len());
    assert_eq!(s.docs.capacity(), s.docs.len());
    assert!(s.tags.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(s.get(14), Some(99));
    assert_eq!(s.get(7), None);
}

#[test]
fn document_hash_sees_any_byte() {
    let a = bson::rawdoc! { "_id": 1, "t": 5, "x": "a" };
    let b = bson::rawdoc! { "_id": 1, "t": 5, "x": "b" };
    assert_ne!(doc_hash(&a), doc_hash(&b));
    assert_eq!(doc_hash(&a), doc_hash(&a.clone()));
}
