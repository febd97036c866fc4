//! A batch's rows of one entity inside its transaction: deletions, soft deletions, the
//! entity's own rows, and each child table's complete new set; and the in-memory key text
//! by which the writer matches rows.

use super::provenance::{self, Tracker};
use super::{BatchOutcome, BigParent, TableOps};
use crate::mapping::{Child, Entity, TableRef, Value};
use anyhow::Result;
use indexmap::IndexMap;
use std::borrow::Cow;

pub(super) fn key_of(row: &[Value], cols: &[usize]) -> Vec<Value> {
    cols.iter().map(|&i| row[i].clone()).collect()
}

pub(super) use crate::mapping::value::key_text;

/// `key_text(&key_of(row, cols))`, borrowed from the row when the key is one text column
/// (a child's link to its parent, most keys): the writer compares a batch's child rows with
/// their parents by this text, and copying two strings per child row was ~4 % of tidemark's
/// CPU on the full mapping, on the writer's task (BENCHMARKS.md, tenth round).
pub(crate) fn key_text_at<'r>(row: &'r [Value], cols: &[usize]) -> Cow<'r, str> {
    match cols {
        [i] => match &row[*i] {
            Value::Text(s) | Value::JsonText { text: s, .. } => Cow::Borrowed(s.as_str()),
            v => Cow::Owned(v.key_text()),
        },
        _ => Cow::Owned(crate::mapping::value::key_text_of(row, cols)),
    }
}

/// What [`write_rows`] writes for one entity (see [`BatchWrite`] for each part).
#[derive(Default, Clone, Copy)]
pub(super) struct Rows<'a> {
    pub(super) rows: &'a [Vec<Value>],
    pub(super) meta: &'a [(String, String)],
    pub(super) children: &'a [Vec<Vec<Value>>],
    pub(super) child_meta: &'a [Vec<(String, String)>],
    /// [`BatchWrite::big`].
    pub(super) big: &'a [BigParent<'a>],
    pub(super) deletes: &'a [Vec<Value>],
    pub(super) soft_deletes: &'a [(Vec<Value>, Value)],
    pub(super) presume_new: bool,
    /// [`BatchWrite::optimistic_inserts`].
    pub(super) optimistic: bool,
    /// [`BatchWrite::skip_fk_checks`]: deletions turn the checks back on around them.
    pub(super) skip_fk_checks: bool,
}

/// Deletions, the entity's rows, then each child table's replace-the-whole-set. With the
/// tracker on, the rows about to change are read first (one query per table) and what
/// changes is recorded for provenance and the inserted/updated counts.
pub(super) async fn write_rows<T: TableOps>(
    tx: &mut T,
    e: &Entity,
    w: Rows<'_>,
    trk: &mut Tracker,
) -> Result<BatchOutcome> {
    let mut out = BatchOutcome::default();
    if !w.deletes.is_empty() {
        delete_rows(tx, e, &w, trk, &mut out).await?;
    }
    if let Some(col) = e.deleted.as_ref().and_then(|d| d.column) {
        soft_delete_rows(tx, e, col, w.soft_deletes, trk, &mut out).await?;
    }
    let is_new = write_main_rows(tx, e, &w, trk, &mut out).await?;
    for (ci, c) in e.children.iter().enumerate() {
        write_child_rows(tx, e, (ci, c), &w, &is_new, trk, &mut out).await?;
    }
    if !w.big.is_empty() {
        super::pieces::write_big_children(tx, e, &w, &is_new, trk, &mut out).await?;
    }
    Ok(out)
}

/// The rows `w.deletes` names, their child rows first (foreign keys).
async fn delete_rows<T: TableOps>(
    tx: &mut T,
    e: &Entity,
    w: &Rows<'_>,
    trk: &mut Tracker,
    out: &mut BatchOutcome,
) -> Result<()> {
    let deletes = w.deletes;
    for c in &e.children {
        // Children of deleted parents go first (foreign keys); only possible when the link is part of the key.
        let links: Option<Vec<usize>> = c
            .parent_links
            .iter()
            .map(|(_, p)| e.pk.iter().position(|k| k == p))
            .collect();
        if let Some(pos) = links {
            let keys: Vec<Vec<Value>> = deletes.iter().map(|k| key_of(k, &pos)).collect();
            out.child_removed += delete_children(tx, c, &keys, trk).await?;
        }
    }
    if trk.on {
        let old = tx.select_rows(e.table_ref(), &e.pk, deletes).await?;
        trk.deletes(e.table_ref(), &old);
    }
    // Rows of other tables may point at these: their ON DELETE actions must run.
    if w.skip_fk_checks {
        tx.fk_checks(true).await?;
    }
    let actions_run = e.referenced_by.is_empty() || tx.runs_delete_actions().await?;
    for r in &e.referenced_by {
        if r.in_key() {
            delete_referrers(tx, r, deletes, trk, out).await?;
        } else if !actions_run {
            // The database will not set the references to these rows to NULL: do it here.
            // Not recorded for provenance, as the database's own action is not either.
            let t = TableRef {
                name: &r.table,
                columns: std::slice::from_ref(&r.columns[r.column]),
                pk: &[0],
            };
            tx.set_null(t, deletes).await?;
        }
    }
    out.deleted += tx.delete_keys(e.table_ref(), &e.pk, deletes).await?;
    if w.skip_fk_checks {
        tx.fk_checks(false).await?;
    }
    Ok(())
}

/// The rows of `r` whose key includes a reference to rows being deleted: `ON DELETE SET NULL`
/// cannot run on a key column (`NOT NULL`), so the database failed the whole batch, and every
/// later run with it (a deleted viz whose content row exists: found on a 20,000-viz demo set
/// in session 22). They go with the row they reference, their child rows first, each
/// recorded for provenance like any deletion; the counts add them to the child rows removed.
/// One level: rows referencing *these* keep the database's actions (or, with SQLite's checks
/// off, point at nothing until `verify` reports them).
async fn delete_referrers<T: TableOps>(
    tx: &mut T,
    r: &crate::mapping::Referrer,
    deletes: &[Vec<Value>],
    trk: &mut Tracker,
    out: &mut BatchOutcome,
) -> Result<()> {
    let t = r.table_ref();
    let rows = tx.select_rows(t, &[r.column], deletes).await?;
    if rows.is_empty() {
        return Ok(());
    }
    for c in &r.children {
        let parent_cols: Vec<usize> = c.parent_links.iter().map(|(_, p)| *p).collect();
        let keys: Vec<Vec<Value>> = rows.iter().map(|row| key_of(row, &parent_cols)).collect();
        out.child_removed += delete_children(tx, c, &keys, trk).await?;
    }
    if trk.on {
        trk.deletes(t, &rows);
    }
    let keys: Vec<Vec<Value>> = rows.iter().map(|row| key_of(row, &r.pk)).collect();
    out.child_removed += tx.delete_keys(t, &r.pk, &keys).await?;
    Ok(())
}

/// The rows of child table `c` whose link to their parent is one of `parent_keys` (values of
/// the parent columns the links name, in link order), recorded for provenance first.
async fn delete_children<T: TableOps>(
    tx: &mut T,
    c: &Child,
    parent_keys: &[Vec<Value>],
    trk: &mut Tracker,
) -> Result<u64> {
    let by: Vec<usize> = c.parent_links.iter().map(|(ci, _)| *ci).collect();
    if trk.on {
        let old = tx.select_rows(c.table_ref(), &by, parent_keys).await?;
        trk.deletes(c.table_ref(), &old);
    }
    tx.delete_keys(c.table_ref(), &by, parent_keys).await
}

/// Mark the rows `soft_deletes` names as deleted (column `col`).
async fn soft_delete_rows<T: TableOps>(
    tx: &mut T,
    e: &Entity,
    col: usize,
    soft_deletes: &[(Vec<Value>, Value)],
    trk: &mut Tracker,
    out: &mut BatchOutcome,
) -> Result<()> {
    let old = if trk.on && !soft_deletes.is_empty() {
        let keys: Vec<Vec<Value>> = soft_deletes.iter().map(|(k, _)| k.clone()).collect();
        provenance::index_rows(
            e.table_ref(),
            tx.select_rows(e.table_ref(), &e.pk, &keys).await?,
        )
    } else {
        Default::default()
    };
    for (key, at) in soft_deletes {
        if let Some(prev) = old.get(&crate::mapping::canon::key_text(e.table_ref(), key)) {
            trk.set_column(e.table_ref(), prev, col, at);
        }
        out.deleted += tx.set_column(e.table_ref(), col, key, at).await?;
    }
    Ok(())
}

/// The entity's own rows: inserted without a read when presumed new, else read first (with
/// the tracker on) so that new rows are inserted and only changed ones upserted. Returns
/// which rows are known not to have been stored before this batch.
async fn write_main_rows<T: TableOps>(
    tx: &mut T,
    e: &Entity,
    w: &Rows<'_>,
    trk: &mut Tracker,
    out: &mut BatchOutcome,
) -> Result<Vec<bool>> {
    let rows = w.rows;
    let mut none_stored = false;
    let mut written = None;
    // Rows the read found stored with the same content (by canonical hash).
    let mut same = Vec::new();
    // Rows known not to be stored before this batch (read first, or presumed and inserted).
    let mut is_new = Vec::new();
    if w.presume_new
        && trk.on
        && !rows.is_empty()
        && w.deletes.is_empty()
        && w.soft_deletes.is_empty()
    {
        written = tx.insert_presumed(e.table_ref(), rows).await?;
        if written.is_some() {
            none_stored = true;
            is_new = vec![true; rows.len()];
            let u = trk.upserts(e.table_ref(), &Default::default(), rows, w.meta);
            out.inserted += u.inserted;
            out.updated += u.updated;
        }
    }
    if written.is_none() && trk.on && !rows.is_empty() {
        let keys: Vec<Vec<Value>> = rows.iter().map(|r| key_of(r, &e.pk)).collect();
        let old = provenance::index_rows(
            e.table_ref(),
            tx.select_rows(e.table_ref(), &e.pk, &keys).await?,
        );
        none_stored = old.is_empty();
        let u = trk.upserts(e.table_ref(), &old, rows, w.meta);
        out.inserted += u.inserted;
        out.updated += u.updated;
        is_new = u.stored.iter().map(|s| !s).collect();
        same = u.same;
    }
    let optimistic = w.optimistic;
    out.written = match written {
        Some(n) => n,
        None if none_stored => insert_absent(tx, e.table_ref(), rows, optimistic).await?,
        // Some new, some stored: the new ones are inserted (COPY on PostgreSQL), the stored
        // ones that changed upserted.
        None if is_new.contains(&true) => {
            let (fresh, known): (Vec<_>, Vec<_>) = rows
                .iter()
                .zip(is_new.iter().zip(&same))
                .filter(|(_, (_, s))| !**s)
                .partition(|(_, (n, _))| **n);
            let fresh: Vec<Vec<Value>> = fresh.into_iter().map(|(r, _)| r.clone()).collect();
            let known: Vec<Vec<Value>> = known.into_iter().map(|(r, _)| r.clone()).collect();
            insert_absent(tx, e.table_ref(), &fresh, optimistic).await?
                + tx.upsert_rows(e.table_ref(), &known).await?
        }
        None => tx.upsert_rows(e.table_ref(), &changed(rows, &same)).await?,
    };
    out.all_new = none_stored;
    out.unchanged = rows.len() as u64 - out.written;
    Ok(is_new)
}

/// The rows of child table `c` (number `ci`): the complete new set of the batch's parents'
/// child rows. Children of parents new in this batch are inserted without a read; for the
/// other parents, stored child rows no longer in the set are removed and the rest upserted.
async fn write_child_rows<T: TableOps>(
    tx: &mut T,
    e: &Entity,
    (ci, c): (usize, &Child),
    w: &Rows<'_>,
    is_new: &[bool],
    trk: &mut Tracker,
    out: &mut BatchOutcome,
) -> Result<()> {
    let rows = w.rows;
    let all_rows = w.children.get(ci).map(Vec::as_slice).unwrap_or_default();
    // Keys and hashes of `all_rows`, when computed ahead.
    let all_meta = w
        .child_meta
        .get(ci)
        .map(Vec::as_slice)
        .filter(|m| m.len() == all_rows.len())
        .unwrap_or_default();
    let parent_cols: Vec<usize> = c.parent_links.iter().map(|(_, p)| *p).collect();
    let mut seen = std::collections::HashSet::new();
    // A big parent's child rows are written apart, in pieces (`sink/pieces.rs`).
    for b in w.big {
        seen.insert(key_text_at(&rows[b.row], &parent_cols));
    }
    let mut parents: Vec<Vec<Value>> = rows
        .iter()
        .filter(|r| seen.insert(key_text_at(r, &parent_cols)))
        .map(|r| key_of(r, &parent_cols))
        .collect();
    let mut new_rows = Cow::Borrowed(all_rows);
    // Parents that did not exist cannot have child rows: the child's foreign key to its
    // parent keeps orphans out. Their children are inserted without reading first; should
    // a child key exist anyway (under another parent), the insert is undone to its
    // savepoint and the rows go the usual way (optimistic: the whole batch is rolled back
    // and written again that way).
    if c.links_whole_parent_key(&e.pk)
        && w.deletes.is_empty()
        && w.soft_deletes.is_empty()
        && is_new.contains(&true)
    {
        let born: std::collections::HashSet<Cow<str>> = rows
            .iter()
            .zip(is_new)
            .filter(|(_, n)| **n)
            .map(|(r, _)| key_text_at(r, &parent_cols))
            .collect();
        if let Some(rest) =
            insert_born_children(tx, c, all_rows, all_meta, &born, w, trk, out).await?
        {
            parents.retain(|k| !born.contains(key_text(k).as_str()));
            new_rows = rest.into();
        }
    }
    let meta = match &new_rows {
        Cow::Borrowed(_) => all_meta,
        Cow::Owned(_) => &[],
    };
    let mut child_same = Vec::new();
    if !parents.is_empty() {
        child_same = remove_stale_children(tx, c, &parents, &new_rows, meta, trk, out).await?;
    }
    out.child_written += tx
        .upsert_rows(c.table_ref(), &changed(&new_rows, &child_same))
        .await?;
    Ok(())
}

/// Insert the child rows of parents born in this batch (`born`, by key text) without
/// reading first. Returns the other child rows when that worked, None when a child key
/// existed anyway (the rows then go the usual way).
#[allow(clippy::too_many_arguments)]
async fn insert_born_children<T: TableOps>(
    tx: &mut T,
    c: &Child,
    all_rows: &[Vec<Value>],
    all_meta: &[(String, String)],
    born: &std::collections::HashSet<Cow<'_, str>>,
    w: &Rows<'_>,
    trk: &mut Tracker,
    out: &mut BatchOutcome,
) -> Result<Option<Vec<Vec<Value>>>> {
    let by: Vec<usize> = c.parent_links.iter().map(|(ci, _)| *ci).collect();
    let (fresh, rest): (Vec<&Vec<Value>>, Vec<&Vec<Value>>) = all_rows
        .iter()
        .partition(|r| born.contains(&key_text_at(r, &by)));
    let fresh: Cow<[Vec<Value>]> = if rest.is_empty() {
        Cow::Borrowed(all_rows)
    } else {
        fresh.into_iter().cloned().collect::<Vec<_>>().into()
    };
    let inserted = if fresh.is_empty() {
        Some(0)
    } else if w.optimistic {
        tx.insert_presumed(c.table_ref(), &fresh).await?
    } else {
        tx.try_insert(c.table_ref(), &fresh).await?
    };
    let Some(n) = inserted else {
        return Ok(None);
    };
    if trk.on {
        let meta = match &fresh {
            Cow::Borrowed(_) => all_meta,
            Cow::Owned(_) => &[],
        };
        trk.upserts(c.table_ref(), &Default::default(), &fresh, meta);
    }
    out.child_written += n;
    Ok(Some(rest.into_iter().cloned().collect()))
}

/// Remove the stored child rows of `parents` that are not in `new_rows` (read whole with
/// the tracker on, so that what changes is recorded). Returns which of `new_rows` are
/// stored as they are (with the tracker on; else empty).
async fn remove_stale_children<T: TableOps>(
    tx: &mut T,
    c: &Child,
    parents: &[Vec<Value>],
    new_rows: &[Vec<Value>],
    meta: &[(String, String)],
    trk: &mut Tracker,
    out: &mut BatchOutcome,
) -> Result<Vec<bool>> {
    let by: Vec<usize> = c.parent_links.iter().map(|(ci, _)| *ci).collect();
    let keep: std::collections::HashSet<Cow<str>> =
        new_rows.iter().map(|r| key_text_at(r, &c.pk)).collect();
    let mut child_same = Vec::new();
    let stale: Vec<Vec<Value>> = if trk.on {
        let old = tx.select_rows(c.table_ref(), &by, parents).await?;
        let (gone, _): (Vec<_>, Vec<_>) = old
            .iter()
            .cloned()
            .partition(|r| !keep.contains(key_text_at(r, &c.pk).as_ref()));
        trk.deletes(c.table_ref(), &gone);
        let mut old = provenance::index_rows(c.table_ref(), old);
        // A row new under these parents may be stored under another parent (two
        // parents' arrays name the same child key): read those by key too, so the
        // move is recorded as an update and a rollback puts the row back.
        let unseen: Vec<Vec<Value>> = new_rows
            .iter()
            .enumerate()
            .filter(|(n, r)| match meta.get(*n) {
                Some((k, _)) => !old.contains_key(k),
                None => !old.contains_key(&crate::mapping::canon::key_of_row(c.table_ref(), r)),
            })
            .map(|(_, r)| key_of(r, &c.pk))
            .collect();
        if !unseen.is_empty() {
            let elsewhere = tx.select_rows(c.table_ref(), &c.pk, &unseen).await?;
            old.extend(provenance::index_rows(c.table_ref(), elsewhere));
        }
        child_same = trk.upserts(c.table_ref(), &old, new_rows, meta).same;
        gone.iter().map(|r| key_of(r, &c.pk)).collect()
    } else {
        let existing = tx.select_keys(c.table_ref(), &by, parents).await?;
        existing
            .into_iter()
            .filter(|k| !keep.contains(key_text(k).as_str()))
            .collect()
    };
    if !stale.is_empty() {
        out.child_removed += tx.delete_keys(c.table_ref(), &c.pk, &stale).await?;
    }
    Ok(child_same)
}

/// The values of `items` in order, keeping for each key only its last value, in the last
/// one's place (one multi-row upsert may not touch a row twice).
pub(super) fn last_per_key<K: std::hash::Hash + Eq, V>(
    items: impl Iterator<Item = (K, V)>,
) -> Vec<V> {
    let mut last: IndexMap<K, V> = IndexMap::new();
    for (k, v) in items {
        last.shift_remove(&k);
        last.insert(k, v);
    }
    last.into_values().collect()
}

/// Insert rows this transaction read as absent: with `optimistic`, without a savepoint (a
/// key another writer inserted since the read fails the batch, [`Sink::write_batch`] writes
/// it again without the optimism); else undone to a savepoint and upserted on a conflict.
async fn insert_absent<T: TableOps>(
    tx: &mut T,
    t: TableRef<'_>,
    rows: &[Vec<Value>],
    optimistic: bool,
) -> Result<u64> {
    if optimistic {
        if let Some(n) = tx.insert_presumed(t, rows).await? {
            return Ok(n);
        }
    }
    tx.insert_new(t, rows).await
}

/// `rows` without those `same` marks as identical to their stored version: an upsert would
/// only compare and skip them, a round-trip and index probes for nothing (a lane re-reading
/// documents another lane already pulled finds most of them unchanged). Borrowed when
/// nothing is left out.
pub(super) fn changed<'r>(rows: &'r [Vec<Value>], same: &[bool]) -> Cow<'r, [Vec<Value>]> {
    if !same.contains(&true) {
        return Cow::Borrowed(rows);
    }
    rows.iter()
        .zip(same)
        .filter(|(_, s)| !**s)
        .map(|(r, _)| r.clone())
        .collect::<Vec<_>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The borrowed key text the writer matches children with parents by is the same text as
    /// the owned one, whatever the key's columns and types (a difference would send a new
    /// parent's children the slow way, or a stored parent's children the fast one).
    #[test]
    fn borrowed_key_text_is_the_owned_key_text() {
        let row = vec![
            Value::Text("viz-1".into()),
            Value::Int(7),
            Value::Null,
            Value::json_text(r#"{"a":1}"#.into()),
            Value::BigInt(-3),
            Value::Text("a\u{1f}b".into()),
        ];
        let keys: [&[usize]; 8] = [&[0], &[1], &[2], &[3], &[4], &[0, 1], &[5, 2], &[3, 0, 4]];
        for cols in keys {
            assert_eq!(
                key_text_at(&row, cols),
                key_text(&key_of(&row, cols)),
                "columns {cols:?}"
            );
        }
        assert!(matches!(key_text_at(&row, &[0]), Cow::Borrowed("viz-1")));
    }
}
