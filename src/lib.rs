//! tidemark: incremental, time-window sync from a legacy MongoDB store into
//! PostgreSQL or SQLite.
//!
//! # Layout
//!
//! The tree reads as the flow of one sync (ARCHITECTURE.md has the long version):
//!
//! - [`commands`]: one module per subcommand. The only layer that prints, chooses exit
//!   codes, or writes the run ledger and report file ([`commands::lifecycle`]).
//! - [`engine`]: one window of one entity: plan the windows, read pages, map them, resolve
//!   dependencies on demand, commit rows and checkpoint together; the lane leases.
//! - [`source`]: reading the legacy MongoDB store.
//! - [`sink`]: everything stored in the target (rows, checkpoints, leases, the runs ledger,
//!   the backfill ledger, dead letters, provenance). All SQL lives here.
//! - [`mapping`]: the declarative mapping, compiled; documents to rows. No I/O.
//! - Base modules: [`settings`], [`cli`], [`timearg`], [`schedule`], [`secret`], [`exit`], [`reach`],
//!   [`retry`], [`telemetry`].
//!
//! Imports point downward only: commands → engine → {source, sink} → mapping → base.
//! There are no import cycles between files (`python3 tools/layout.py` lists them).

pub mod cli;
pub mod commands;
pub mod engine;
pub mod exit;
pub mod mapping;
pub mod prehashed;
pub mod reach;
pub mod retry;
pub mod schedule;
pub mod secret;
pub mod settings;
pub mod sink;
pub mod source;
pub mod span;
pub mod telemetry;
pub mod timearg;
