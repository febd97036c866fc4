//! The child rows of big parents (documents with very large arrays, `engine::big::BigDoc`),
//! mapped and written [`PIECE_ROWS`] at a time inside the batch's transaction, so that the
//! writer holds the document and one piece, never the whole array as rows. The same
//! replace-the-whole-set semantics as `sink/rows.rs`: stored child rows of the parent that
//! are no longer in its array are removed, the rest inserted or upserted, what changes
//! recorded for provenance (stored as it goes).

use super::batch::record_provenance;
use super::provenance::{self, Tracker};
use super::rows::{changed, key_of, Rows};
use super::{BatchOutcome, TableOps};
use crate::mapping::{child_key_hash, Child, ChildRows, Entity, Value};
use anyhow::{Context, Result};
use std::collections::HashSet;

/// Child rows mapped and written at a time for a big parent; also the page size of the read
/// of its stored child rows. A few thousand: large statements, a few MB of rows.
pub const PIECE_ROWS: usize = 4_000;

/// A parent of the batch whose child rows the writer maps from its document and writes in
/// pieces (see `engine::big::BigDoc`, which checked that every element maps and that its
/// child keys are distinct).
#[derive(Clone, Copy)]
pub struct BigParent<'a> {
    /// Its row, by index in [`super::BatchWrite::rows`].
    pub row: usize,
    pub doc: &'a bson::RawDocument,
    /// Per child table and column with a reference (`(child, column, keys, null)`): the key
    /// texts missing from the target, and whether the column's policy nulls them (else the
    /// child row is dropped).
    pub missing: &'a [(usize, usize, HashSet<String>, bool)],
}

/// Write the child rows of every big parent of `w`, table by table: for a parent this batch
/// inserted (`is_new`, indexed like `w.rows`) they are inserted; for the others, the stored
/// ones no longer in the array are removed first, then the array's rows upserted.
pub(super) async fn write_big_children<T: TableOps>(
    tx: &mut T,
    e: &Entity,
    w: &Rows<'_>,
    is_new: &[bool],
    trk: &mut Tracker,
    out: &mut BatchOutcome,
) -> Result<()> {
    for p in w.big {
        let row = &w.rows[p.row];
        let born = is_new.get(p.row).copied().unwrap_or(false)
            && w.deletes.is_empty()
            && w.soft_deletes.is_empty();
        for (ci, c) in e.children.iter().enumerate() {
            // A parent that did not exist has no child rows (the child's foreign key).
            let born = born && c.links_whole_parent_key(&e.pk);
            if !born {
                remove_stale(tx, c, row, (ci, p), trk, out).await?;
            }
            let mut rows = Piece::new(c, row, (ci, p))?;
            loop {
                let piece = rows.next()?;
                if piece.is_empty() {
                    break;
                }
                write_piece(tx, c, &piece, born && w.optimistic, born, trk, out).await?;
                flush_provenance(tx, trk).await?;
            }
        }
    }
    Ok(())
}

/// A big parent's rows of one child table, a piece at a time, with the missing-reference
/// policies applied (a missing key nulled, or its row dropped).
struct Piece<'a> {
    rows: ChildRows<'a>,
    /// `(column, missing keys, null)` of this child table.
    missing: Vec<(usize, &'a HashSet<String>, bool)>,
}

impl<'a> Piece<'a> {
    fn new(c: &'a Child, row: &'a [Value], (ci, p): (usize, &'a BigParent<'a>)) -> Result<Self> {
        let missing = p
            .missing
            .iter()
            .filter(|m| m.0 == ci)
            .map(|(_, col, keys, null)| (*col, keys, *null))
            .collect();
        Ok(Piece {
            rows: c.rows(p.doc, row).map_err(mapping_changed)?,
            missing,
        })
    }

    /// The next rows (up to [`PIECE_ROWS`]); empty at the end.
    fn next(&mut self) -> Result<Vec<Vec<Value>>> {
        let mut piece = self.rows.take_piece(PIECE_ROWS).map_err(mapping_changed)?;
        if !self.missing.is_empty() {
            piece.retain_mut(|r| {
                self.missing.iter().all(|(col, keys, null)| {
                    if r[*col] == Value::Null || !keys.contains(&r[*col].key_text()) {
                        return true;
                    }
                    r[*col] = Value::Null;
                    *null
                })
            });
        }
        Ok(piece)
    }
}

/// Mapping checked every element before the batch: a failure now is a defect, and the
/// batch is rolled back.
fn mapping_changed(e: crate::mapping::MapError) -> anyhow::Error {
    anyhow::anyhow!(e).context("mapping a big document's child rows again while writing them")
}

/// Remove the stored child rows of the parent `row` that its array no longer has: its new
/// child keys are hashed (one pass over the array), then its stored rows read a page at a
/// time and those not among them deleted (recorded for provenance).
async fn remove_stale<T: TableOps>(
    tx: &mut T,
    c: &Child,
    row: &[Value],
    (ci, p): (usize, &BigParent<'_>),
    trk: &mut Tracker,
    out: &mut BatchOutcome,
) -> Result<()> {
    let mut keep = HashSet::new();
    let mut rows = Piece::new(c, row, (ci, p))?;
    loop {
        let piece = rows.next()?;
        if piece.is_empty() {
            break;
        }
        keep.extend(piece.iter().map(|r| child_key_hash(r, &c.pk)));
    }
    let (by, parent_cols): (Vec<usize>, Vec<usize>) = c.parent_links.iter().copied().unzip();
    let parent = key_of(row, &parent_cols);
    let mut after: Option<Vec<Value>> = None;
    loop {
        let stored = tx
            .select_page(c.table_ref(), &by, &parent, after.as_deref(), PIECE_ROWS)
            .await?;
        let Some(last) = stored.last() else { break };
        after = Some(key_of(last, &c.pk));
        let full = stored.len() == PIECE_ROWS;
        let stale: Vec<Vec<Value>> = stored
            .into_iter()
            .filter(|r| !keep.contains(&child_key_hash(r, &c.pk)))
            .collect();
        if !stale.is_empty() {
            if trk.on {
                trk.deletes(c.table_ref(), &stale);
            }
            let keys: Vec<Vec<Value>> = stale.iter().map(|r| key_of(r, &c.pk)).collect();
            out.child_removed += tx.delete_keys(c.table_ref(), &c.pk, &keys).await?;
            flush_provenance(tx, trk).await?;
        }
        if !full {
            break;
        }
    }
    Ok(())
}

/// Write one piece: inserted when its parent is new (`insert`; without a savepoint when
/// `presumed`), else, or when a key exists anyway (under another parent), read first with
/// the tracker on and upserted.
async fn write_piece<T: TableOps>(
    tx: &mut T,
    c: &Child,
    piece: &[Vec<Value>],
    presumed: bool,
    insert: bool,
    trk: &mut Tracker,
    out: &mut BatchOutcome,
) -> Result<()> {
    let t = c.table_ref();
    if insert {
        let n = if presumed {
            tx.insert_presumed(t, piece).await?
        } else {
            tx.try_insert(t, piece).await?
        };
        if let Some(n) = n {
            if trk.on {
                trk.upserts(t, &Default::default(), piece, &[]);
            }
            out.child_written += n;
            return Ok(());
        }
    }
    let mut same = Vec::new();
    if trk.on {
        let keys: Vec<Vec<Value>> = piece.iter().map(|r| key_of(r, &c.pk)).collect();
        let old = provenance::index_rows(t, tx.select_rows(t, &c.pk, &keys).await?);
        same = trk.upserts(t, &old, piece, &[]).same;
    }
    out.child_written += tx.upsert_rows(t, &changed(piece, &same)).await?;
    Ok(())
}

/// Store what the tracker recorded so far, once it holds a piece's worth, and forget it:
/// provenance records are undone newest first, so the child rows written after their
/// parent are undone before it, as when the batch stores them at once.
async fn flush_provenance<T: TableOps>(tx: &mut T, trk: &mut Tracker) -> Result<()> {
    if trk.changes.len() < PIECE_ROWS {
        return Ok(());
    }
    if let Some((run_id, now)) = &trk.store {
        record_provenance(tx, run_id, trk, *now)
            .await
            .context("recording provenance of a big document's child rows")?;
    }
    trk.changes.clear();
    Ok(())
}
