//! Batches of one window written on several PostgreSQL connections at once, committed in
//! order (`target.batches_in_flight`).
//!
//! One batch's transaction is a chain of statements, each waiting for PostgreSQL's answer and
//! for tidemark's work before the next; on the benchmark's full mapping both cores stayed
//! 35–43 % idle through the vizzes lane (BENCHMARKS.md). So a window may start writing batch
//! N+1 while batch N is still being written. What keeps that exactly as correct as one batch
//! after the other:
//!
//! 1. **Commit order.** Batch N+1 sends every statement but its checkpoint and `COMMIT`, then
//!    waits for its turn: N committed and the window went on ([`Turn::done`]). If N failed,
//!    N+1 rolls back; its checkpoint never passes a batch that is not in the target.
//! 2. **Nothing read that the other writes.** The window starts N+1 early only when no row
//!    key it writes (any table, child tables and pulled rows included) and no tool record it
//!    writes or clears (dead letters, missing references, pending) is one that a batch still
//!    in flight writes, and neither has deletions (whose `ON DELETE` actions reach rows by
//!    reference, not by key). Otherwise N+1 starts once N is done. So N+1's reads of stored
//!    rows, which cannot see N's uncommitted writes, see nothing N changes.
//! 3. **No wait PostgreSQL cannot see.** N+1 must not wait for N outside the database while
//!    N might wait for one of N+1's row locks inside it (a unique index of the user's own, a
//!    foreign key to a row N+1 changes): neither would ever move. So N takes an advisory
//!    lock ([`Order::key`]) as its transaction's first statement, and N+1 waits for N's
//!    transaction to end by asking for that lock (shared), where PostgreSQL's deadlock
//!    detector sees both waits. Of two batches in such a cycle, PostgreSQL aborts one: the
//!    later one is written again once the earlier is done ([`Yielded`]); the earlier one is
//!    written again after asking the later one to give way ([`Turn::yield_next`]).
//!
//! SQLite has one writer at a time: there, and in dry runs, batches go one after the other.

use anyhow::{bail, Result};
use tokio::sync::watch;

/// Where one batch in flight is, as the batch after it sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Turn {
    /// Transactions this batch has begun (each takes its own advisory lock).
    pub attempt: u32,
    /// The current attempt's transaction holds its advisory lock.
    pub locked: bool,
    /// A deadlock aborted this batch: the batch after it rolls back and waits.
    pub yield_next: bool,
    /// Set by the window once the batch is over: `true` committed and the window goes on.
    pub done: Option<bool>,
}

/// One batch's place in the order of its window's batches.
pub struct Order {
    /// Base of this batch's advisory lock keys (one per attempt: `key + attempt`).
    pub key: i64,
    /// This batch's turn, watched by the batch after it.
    pub turn: watch::Sender<Turn>,
    /// The batch before, when it was still in flight as this one started: its key and turn.
    pub after: Option<(i64, watch::Receiver<Turn>)>,
}

/// The batch before this one failed or the window stopped after it: this one rolls back.
#[derive(Debug, thiserror::Error)]
#[error("the batch before this one was not committed; this batch was rolled back with it")]
pub struct PredecessorFailed;

/// The batch before this one hit a deadlock with this one and asked it to give way.
#[derive(Debug, thiserror::Error)]
#[error("gave way to the batch before it (a deadlock between the two)")]
pub(crate) struct Yielded;

impl Order {
    /// A new batch's order, after `before` (the batch still in flight before it, if any).
    pub fn new(before: Option<&Order>) -> Order {
        let (turn, _) = watch::channel(Turn::default());
        Order {
            key: rand::random::<i64>() & !0xffff,
            turn,
            after: before.map(|b| (b.key, b.turn.subscribe())),
        }
    }

    /// The advisory lock key of this batch's current attempt.
    pub(crate) fn lock_key(&self) -> i64 {
        attempt_key(self.key, self.turn.borrow().attempt)
    }

    /// Called once the attempt's transaction holds its advisory lock.
    pub(crate) fn locked(&self) {
        self.turn.send_modify(|t| t.locked = true);
    }

    /// Called once the attempt's transaction is over without committing.
    pub(crate) fn next_attempt(&self, yield_next: bool) {
        self.turn.send_modify(|t| {
            t.attempt += 1;
            t.locked = false;
            t.yield_next |= yield_next;
        });
    }

    /// The window's verdict on this batch (only the window knows whether it goes on).
    pub fn done(&self, committed: bool) {
        self.turn.send_modify(|t| t.done = Some(committed));
    }

    /// Wait, outside any transaction, until the batch before is over; its verdict.
    pub(crate) async fn before_done(&self) -> bool {
        let Some((_, rx)) = &self.after else {
            return true;
        };
        let mut rx = rx.clone();
        let done = rx.wait_for(|t| t.done.is_some()).await;
        matches!(done.map(|t| t.done), Ok(Some(true)))
    }
}

/// Wait inside transaction `tx` until the batch before is committed (see the module). Errors
/// with [`PredecessorFailed`] or [`Yielded`]; a deadlock comes back as PostgreSQL's error.
pub(crate) async fn wait_turn(
    tx: &mut sqlx::PgConnection,
    after: &(i64, watch::Receiver<Turn>),
) -> Result<()> {
    let (key, rx) = after;
    let mut rx = rx.clone();
    loop {
        let t = *rx.borrow_and_update();
        match t.done {
            Some(true) => return Ok(()),
            Some(false) => bail!(PredecessorFailed),
            None => {}
        }
        if t.yield_next {
            bail!(Yielded);
        }
        if t.locked {
            // Returns once that attempt's transaction has ended; the lock stays with this
            // transaction (shared, on a key no one takes again).
            sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
                .bind(attempt_key(*key, t.attempt))
                .execute(&mut *tx)
                .await?;
            if rx.wait_for(|n| *n != t).await.is_err() {
                bail!(PredecessorFailed);
            }
        } else if rx.changed().await.is_err() {
            bail!(PredecessorFailed);
        }
    }
}

/// The advisory lock key of a batch's attempt: its base key (low 16 bits clear) and the
/// attempt in those bits.
fn attempt_key(base: i64, attempt: u32) -> i64 {
    base | i64::from(attempt & 0xffff)
}

/// PostgreSQL aborted the transaction to break a deadlock (SQLSTATE 40P01).
pub(crate) fn is_deadlock(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<sqlx::Error>()
            .and_then(|s| s.as_database_error())
            .and_then(|d| d.code())
            .is_some_and(|code| code == "40P01")
    })
}

/// The keys a batch writes or clears, hashed with their table: two batches whose sets meet
/// are not written at the same time.
#[derive(Debug, Default)]
pub struct Touched {
    /// Already hashes: the set does not hash them again.
    keys:
        std::collections::HashSet<u64, std::hash::BuildHasherDefault<crate::prehashed::Prehashed>>,
    /// Deletions: nothing may be written beside this batch.
    pub exclusive: bool,
}

impl Touched {
    /// A row of `table` with key text `key`.
    pub fn add(&mut self, table: &str, key: &str) {
        self.insert(1, table, key);
    }

    /// A tool record (dead letter, missing reference, pending entry) of `(entity, source id)`.
    pub fn add_record(&mut self, entity: &str, id: &str) {
        self.insert(2, entity, id);
    }

    fn insert(&mut self, kind: u8, name: &str, key: &str) {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        (kind, name, key).hash(&mut h);
        self.keys.insert(h.finish());
    }

    /// Whether this batch and `other` may be written at the same time.
    pub fn disjoint(&self, other: &Touched) -> bool {
        !self.exclusive && !other.exclusive && self.keys.is_disjoint(&other.keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_sets_meet_on_the_same_key_of_the_same_table_only() {
        let mut a = Touched::default();
        a.add("vizzes", "v1");
        a.add("users", "u1");
        let mut b = Touched::default();
        b.add("users", "v1");
        b.add("vizzes", "v2");
        assert!(a.disjoint(&b));
        b.add("users", "u1");
        assert!(!a.disjoint(&b));
        assert!(!b.disjoint(&a));
        let mut c = Touched::default();
        c.add("files", "f1");
        assert!(a.disjoint(&c));
        c.exclusive = true;
        assert!(
            !a.disjoint(&c),
            "a batch with deletions overlaps everything"
        );
    }

    #[tokio::test]
    async fn a_verdict_reaches_the_batch_after() {
        let first = Order::new(None);
        let second = Order::new(Some(&first));
        assert!(first.before_done().await, "nothing before the first batch");
        first.done(false);
        assert!(!second.before_done().await);
        let third = Order::new(Some(&second));
        second.done(true);
        assert!(third.before_done().await);
    }
}
