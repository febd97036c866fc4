//! The legacy store. Only reads: no write command is ever sent to the source.

mod mongo;
mod probe;
mod query;
mod reach;
pub use query::readable_range;

pub use mongo::{in_time_order, Page, Position, Source};
pub use query::{encode_bound, window_filter};
