//! tidemark: incremental, time-window sync from a legacy MongoDB store into
//! PostgreSQL or SQLite. See DESIGN.md for the promises this code keeps.

pub mod app;
pub mod backfill;
pub mod canon;
pub mod cli;
pub mod daemon;
pub mod deadletters;
pub mod demo;
pub mod exit;
pub mod lock;
pub mod mapping;
pub mod pipeline;
pub mod progress;
pub mod prom;
pub mod pulled;
pub mod record;
pub mod records;
pub mod reports;
pub mod resolve;
pub mod rollback;
pub mod secret;
pub mod settings;
pub mod sink;
pub mod source;
pub mod status;
pub mod sweep;
pub mod telemetry;
pub mod timearg;
pub mod trust;
pub mod verify;
pub mod window;
