//! One window of one entity: plan the windows ([`window`]), read a page and map it
//! ([`page`]; a document with very large arrays: [`big`]), resolve what it depends on ([`resolve`], with the run's [`memo`]), commit rows
//! with the checkpoint ([`batch`]), a window's stages ([`drive`]), an entity's windows
//! ([`pipeline`]), and skip what this run already wrote ([`skip`], [`pulled`]); ids of other BSON types with the same key ([`twins`]). What a run shares
//! and counts: [`ctx`]. One writer per lane ([`lane`]). Which entities a command takes:
//! [`select`].
//! No printing: commands report what the engine returns.

pub mod batch;
pub mod big;
pub mod ctx;
pub mod drive;
pub mod lane;
pub mod memo;
pub mod page;
pub mod pipeline;
pub mod pulled;
pub mod resolve;
pub mod select;
pub mod skip;
pub mod twins;
pub mod verify;
pub mod window;
