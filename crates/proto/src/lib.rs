//! Cairn's wire protocol: value types, request/response messages and the closed error-code enum.
//!
//! This crate is pure (serde + postcard only) so that every other crate, and the fuzzers, can
//! share one definition of what crosses the network. Anything serializable lives here and only
//! here: a serializable type is a compatibility promise.

pub mod callback;
pub mod chunk;
pub mod error;
pub mod frame;
pub mod meta;
pub mod placement;
pub mod types;

pub use error::{ErrorCode, WireError};
pub use types::*;

/// Bumped whenever a message changes shape; exchanged in `Hello` so mismatched peers fail loudly.
pub const PROTOCOL_VERSION: u32 = 17;
/// `_IOR('C', 1, [u8; 4096])` on any file or directory of a mount: the client answers with
/// its request counters as text (`cairn stats`). The kernel forwards it with its 4 KiB buffer.
pub const STATS_IOCTL: u32 = 0x9000_4301;
/// Size of the answer buffer of [`STATS_IOCTL`], as encoded in the ioctl number.
pub const STATS_IOCTL_BYTES: usize = 4096;

/// ALPN string for every Cairn QUIC connection.
pub const ALPN: &[u8] = b"cairn/1";

/// The write lease epoch of a new file, held by its creator when it was created open: a
/// `create` then needs no `WriteLease` round trip before its writes.
pub const FIRST_LEASE: u64 = 1;
