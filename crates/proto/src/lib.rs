//! Cairn's wire protocol: value types, request/response messages and the closed error-code enum.
//!
//! This crate is pure (serde + postcard only) so that every other crate, and the fuzzers, can
//! share one definition of what crosses the network. Anything serializable lives here and only
//! here: a serializable type is a compatibility promise.

pub mod chunk;
pub mod error;
pub mod frame;
pub mod meta;
pub mod types;

pub use error::{ErrorCode, WireError};
pub use types::*;

/// Bumped whenever a message changes shape; exchanged in `Hello` so mismatched peers fail loudly.
pub const PROTOCOL_VERSION: u32 = 6;
/// ALPN string for every Cairn QUIC connection.
pub const ALPN: &[u8] = b"cairn/1";
