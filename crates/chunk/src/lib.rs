//! The chunk service: immutable blocks on local disk, served over QUIC.
//!
//! Blocks never change after they are written, so a chunk server needs no locking beyond the
//! filesystem's and SQLite's own: a small block is a row of one database, a larger one is
//! written to a temporary file and renamed into place.

mod metrics;
mod scrub;
mod service;
mod small;
mod spares;
mod store;

pub use scrub::ScrubConfig;
pub use service::{ChunkConfig, RunError, run};
pub use store::{BlockStore, StoreError};
