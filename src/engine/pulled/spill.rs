//! The pulled set's spill file: one sorted array of 16-byte entries (slot, document hash)
//! in an unnamed temporary file, read with `pread`, found through an in-memory fence
//! (module documentation of `pulled`).

use super::shard::merge_sorted;
use super::{spread, Prehashed, GONE};
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::io::Write;
use std::os::unix::fs::FileExt;

/// Entries of the spill file per block: a lookup reads one block (1 KiB).
pub const BLOCK: usize = 64;

/// Bytes per spill-file entry: the slot and the document hash, little-endian.
const ENTRY: usize = 16;

/// The run's spill file (module documentation).
pub(super) struct Spill {
    file: std::fs::File,
    /// Entries in the file, forgotten ones included.
    pub(super) entries: usize,
    /// Entries not forgotten.
    pub(super) live: usize,
    /// The slot of the first entry of each block.
    pub(super) fences: Vec<u64>,
    /// What [`Pulled::same`] read from the file ahead of a batch's turn, by [`spread`] slot,
    /// so that [`Pulled::take_same`] confirms it without reading again. Entries leave when
    /// confirmed, when their slot is forgotten, and all at the next spill.
    pub(super) looked: HashMap<u64, u64, BuildHasherDefault<Prehashed>>,
}

/// Looks ahead kept at most (pages in flight hold a few thousand); past it they start over.
const LOOKED_MAX: usize = 65_536;

impl Spill {
    /// The entry of `slot`: its index in the file and its document hash ([`GONE`] if forgotten).
    fn find(&self, slot: u64) -> std::io::Result<Option<(usize, u64)>> {
        let block = self.fences.partition_point(|&f| f <= slot);
        if block == 0 {
            return Ok(None);
        }
        let start = (block - 1) * BLOCK;
        let n = BLOCK.min(self.entries - start);
        let mut buf = [0u8; BLOCK * ENTRY];
        let buf = &mut buf[..n * ENTRY];
        self.file.read_exact_at(buf, (start * ENTRY) as u64)?;
        let at = |i: usize| u64::from_le_bytes(buf[i * ENTRY..i * ENTRY + 8].try_into().unwrap());
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match at(mid).cmp(&slot) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    let i = mid * ENTRY + 8;
                    let doc = u64::from_le_bytes(buf[i..i + 8].try_into().unwrap());
                    return Ok(Some((start + mid, doc)));
                }
            }
        }
        Ok(None)
    }

    /// The live document hash of `slot` in the file, if any.
    pub(super) fn get(&self, slot: u64) -> std::io::Result<Option<u64>> {
        Ok(self.find(slot)?.map(|(_, d)| d).filter(|&d| d != GONE))
    }

    /// Set the document hash of `slot` where the file holds it live ([`GONE`]: forget it);
    /// whether it did.
    pub(super) fn set(&mut self, slot: u64, doc: u64) -> std::io::Result<bool> {
        self.looked.remove(&spread(slot));
        match self.find(slot)? {
            Some((i, old)) if old != GONE => {
                self.file
                    .write_all_at(&doc.to_le_bytes(), (i * ENTRY + 8) as u64)?;
                if doc == GONE {
                    self.live -= 1;
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Keep what a look ahead read from the file for the batch's turn (bounded: past
    /// [`LOOKED_MAX`] they start over).
    pub(super) fn keep_look(&mut self, slot: u64, doc: u64) {
        if self.looked.len() >= LOOKED_MAX {
            self.looked.clear();
        }
        self.looked.insert(spread(slot), doc);
    }

    /// Every live entry of the file, in order, merged with `mem` (sorted, live entries; `mem`
    /// wins a slot both hold), written to a new file under `dir`.
    pub(super) fn merge(
        old: Option<&Spill>,
        mem: impl Iterator<Item = (u64, u64)>,
        dir: &std::path::Path,
    ) -> std::io::Result<Spill> {
        let file = tempfile::tempfile_in(dir)?;
        let mut out = std::io::BufWriter::with_capacity(64 * 1024, &file);
        let mut fences = Vec::new();
        let mut entries = 0usize;
        let mut put = |slot: u64, doc: u64| -> std::io::Result<()> {
            if entries.is_multiple_of(BLOCK) {
                fences.push(slot);
            }
            entries += 1;
            out.write_all(&slot.to_le_bytes())?;
            out.write_all(&doc.to_le_bytes())
        };
        merge_sorted(OldEntries::new(old), mem, &mut put)?;
        out.flush()?;
        drop(out);
        fences.shrink_to_fit();
        Ok(Spill {
            file,
            entries,
            live: entries,
            fences,
            looked: Default::default(),
        })
    }
}

/// The live entries of a spill file, read in order 4,096 at a time.
struct OldEntries<'a> {
    spill: Option<&'a Spill>,
    buf: Vec<u8>,
    at: usize,
    read: usize,
}

impl<'a> OldEntries<'a> {
    fn new(spill: Option<&'a Spill>) -> Self {
        OldEntries {
            spill,
            buf: Vec::new(),
            at: 0,
            read: 0,
        }
    }

    fn read_next(&mut self) -> std::io::Result<Option<(u64, u64)>> {
        let Some(s) = self.spill else {
            return Ok(None);
        };
        loop {
            if self.at * ENTRY >= self.buf.len() {
                if self.read >= s.entries {
                    return Ok(None);
                }
                let n = 4096.min(s.entries - self.read);
                self.buf.resize(n * ENTRY, 0);
                s.file
                    .read_exact_at(&mut self.buf, (self.read * ENTRY) as u64)?;
                self.read += n;
                self.at = 0;
            }
            let i = self.at * ENTRY;
            self.at += 1;
            let slot = u64::from_le_bytes(self.buf[i..i + 8].try_into().unwrap());
            let doc = u64::from_le_bytes(self.buf[i + 8..i + 16].try_into().unwrap());
            if doc != GONE {
                return Ok(Some((slot, doc)));
            }
        }
    }
}

impl Iterator for OldEntries<'_> {
    type Item = std::io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.read_next().transpose()
    }
}
