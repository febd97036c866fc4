//! One window of one entity: plan the windows ([`window`]), read and map pages, resolve
//! what they depend on ([`resolve`]), commit rows with the checkpoint ([`pipeline`]), and
//! remember what this run already wrote ([`pulled`]). One writer per lane ([`lane`]).
//! No printing: commands report what the engine returns.

pub mod lane;
pub mod pipeline;
pub mod pulled;
pub mod resolve;
pub mod window;
