//! Requests to chunk servers. Block bytes travel as the frame payload, not in these headers.

use crate::types::SliceId;
use serde::{Deserialize, Serialize};

/// Names one immutable block: the `index`-th block of slice `slice`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    pub slice: SliceId,
    pub index: u32,
}

/// A request to a chunk server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, strum::IntoStaticStr)]
pub enum ChunkRequest {
    /// Stores the payload (an encoded block) under `key`; with `sync`, fsyncs before answering.
    Put { key: BlockKey, sync: bool },
    /// Returns the encoded block as the payload.
    Get { key: BlockKey },
    /// Makes blocks stored earlier without `sync` durable.
    Sync { keys: Vec<BlockKey> },
    /// Removes blocks; missing ones are ignored.
    Delete { keys: Vec<BlockKey> },
    /// Capacity and free bytes of the data directory.
    Stat,
    /// Copies blocks from the chunk server at `from` (`host:port`) and stores them durably:
    /// how the metadata server re-replicates a lost server's blocks.
    Replicate { keys: Vec<BlockKey>, from: String },
    /// The blocks stored here of the slices whose id modulo 256 is `bucket`, so the metadata
    /// server can find orphans (reconciliation) a bucket at a time.
    List { bucket: u8 },
    /// Returns frame `frame` of a framed block (the block's header and frame table, then the
    /// frame; answered `Frame`), or, for a block of an earlier format, the whole block
    /// (answered `Block`): a small read fetches 32 KiB instead of the block.
    GetFrame { key: BlockKey, frame: u32 },
    /// Stores several blocks, their encoded bytes back to back in the payload in the order
    /// and with the lengths of `blocks`; with `sync`, fsyncs before answering. What a client
    /// sends for the small slices of many random writes: one request, and one database
    /// transaction for the small blocks, instead of one each.
    PutMany { blocks: Vec<(BlockKey, u32)>, sync: bool },
}

/// A successful answer from a chunk server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum ChunkResponse {
    Done,
    /// The payload carries the block.
    Block,
    Stat {
        capacity: u64,
        free: u64,
    },
    /// Sorted.
    Blocks(Vec<BlockKey>),
    /// The payload carries one frame of a block, behind the block's header and table.
    Frame,
}
