//! Time spans every layer shares: a half-open window `[from, to)` in UTC with millisecond
//! precision (BSON dates are milliseconds), a lane's checkpoint state, how a backfill range
//! is cut, and the timestamp text of logs, keys and reports. Window planning is in
//! `engine/window.rs`.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A half-open `[from, to)` interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl Window {
    pub fn new(from: DateTime<Utc>, to: DateTime<Utc>) -> Self {
        debug_assert!(from < to, "empty window {from}..{to}");
        Self { from, to }
    }

    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.from <= t && t < self.to
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {})", fmt_ts(self.from), fmt_ts(self.to))
    }
}

/// RFC 3339 with milliseconds and `Z`.
pub fn fmt_ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Drop sub-millisecond precision, which BSON cannot hold.
pub fn to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(TimeDelta::milliseconds(1)).unwrap_or(t)
}

/// What the checkpoint table says about one lane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaneState {
    /// Everything strictly before this has been read (the end of the last finished window).
    pub watermark: Option<DateTime<Utc>>,
    /// A window that was started and not finished (its position is kept by the caller).
    pub open: Option<Window>,
}

/// Documents per chunk when `--chunk` is not given. Each chunk costs a few milliseconds
/// of its own (ledger claim, checkpoint, its first query): at 50,000 documents that is well
/// under 1 % of the chunk's time, and a chunk still takes only seconds (BENCHMARKS.md,
/// sixteenth round).
pub const DEFAULT_CHUNK_DOCS: u64 = 50_000;

/// How a backfill's range is cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkBy {
    /// About this many documents per chunk, per entity (indexed counts while planning).
    Docs(u64),
    /// Fixed-length chunks (`--chunk`).
    Duration(Duration),
}

impl ChunkBy {
    /// `--chunk` when given, else chunks of `docs` documents.
    pub fn from_args(chunk: Option<Duration>, docs: Option<u64>) -> anyhow::Result<Self> {
        match (chunk, docs) {
            (Some(d), _) if d.is_zero() => Err(crate::exit::Failure::Config(anyhow::anyhow!(
                "--chunk must be longer than 0s, e.g. 1d (or leave it out: chunks are then cut by document count)"
            ))
            .into()),
            (Some(d), _) => Ok(Self::Duration(d)),
            (None, Some(0)) => Err(crate::exit::Failure::Config(anyhow::anyhow!(
                "--chunk-docs must be at least 1, e.g. {DEFAULT_CHUNK_DOCS}"
            ))
            .into()),
            (None, n) => Ok(Self::Docs(n.unwrap_or(DEFAULT_CHUNK_DOCS))),
        }
    }

    /// What the ledger's `chunk_ms` column holds: the length, or 0 when chunks were cut by
    /// document count (their bounds are in `tidemark_backfill_chunks`).
    pub fn ledger_ms(self) -> i64 {
        match self {
            Self::Duration(d) => d.as_millis() as i64,
            Self::Docs(_) => 0,
        }
    }

    /// This setting's part of a backfill's id.
    pub fn id_key(self) -> String {
        match self {
            Self::Duration(d) => d.as_millis().to_string(),
            Self::Docs(n) => format!("docs:{n}"),
        }
    }
}
