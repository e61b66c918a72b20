//! The chunk service: immutable blocks in files on local disk, served over QUIC.
//!
//! Blocks never change after they are written, so a chunk server needs no locking beyond the
//! filesystem's own: a block is written to a temporary file and renamed into place.

mod metrics;
mod scrub;
mod service;
mod spares;
mod store;

pub use scrub::ScrubConfig;
pub use service::{ChunkConfig, RunError, run};
pub use store::{BlockStore, StoreError};
