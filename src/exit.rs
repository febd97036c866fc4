//! Exit codes a timer, a shell or monitoring can act on.

use thiserror::Error;

pub const OK: i32 = 0;
pub const FAILURE: i32 = 1;
/// The command line is wrong (clap's own code; `status` answers Nagios UNKNOWN instead).
pub const USAGE: i32 = 2;
pub const PARTIAL: i32 = 3;
pub const LOCK_HELD: i32 = 4;
pub const CONFIG: i32 = 5;
pub const UNAVAILABLE: i32 = 6;

/// Failures that map to a specific exit code; anything else exits with [`FAILURE`].
#[derive(Debug, Error)]
pub enum Failure {
    /// Settings or mapping are invalid: nothing ran.
    #[error("{0:#}")]
    Config(anyhow::Error),
    /// Source or target cannot be reached: nothing ran.
    #[error("{0:#}")]
    Unavailable(anyhow::Error),
    /// Another process holds the lane.
    #[error("{0}")]
    LockHeld(String),
    /// The run finished or stopped with data problems (dead letters over budget).
    #[error("{0}")]
    Partial(String),
}

/// The process exit code for an error.
pub fn code(err: &anyhow::Error) -> i32 {
    match err.downcast_ref::<Failure>() {
        Some(Failure::Config(_)) => CONFIG,
        Some(Failure::Unavailable(_)) => UNAVAILABLE,
        Some(Failure::LockHeld(_)) => LOCK_HELD,
        Some(Failure::Partial(_)) => PARTIAL,
        None => FAILURE,
    }
}
