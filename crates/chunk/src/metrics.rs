//! What a chunk server reports to Prometheus besides its requests: bytes stored and served,
//! corrupt blocks found, and its disk's size and free space (read when scraped).

use crate::store::BlockStore;
use cairn_metrics::{Counter, Gauge, Metrics};

/// A chunk server's own counters and gauges.
#[derive(Clone)]
pub(crate) struct ChunkGauges {
    pub(crate) stored: Counter,
    pub(crate) served: Counter,
    pub(crate) corrupt: Counter,
    capacity: Gauge,
    free: Gauge,
}

impl ChunkGauges {
    pub(crate) fn register(m: &mut Metrics) -> ChunkGauges {
        ChunkGauges {
            stored: m.counter("stored_bytes", "Block bytes written (Put, Replicate)"),
            served: m.counter("served_bytes", "Block bytes read and sent (Get)"),
            corrupt: m.counter("corrupt_blocks", "Blocks that failed their checksum when read"),
            capacity: m.gauge("capacity_bytes", "Size of the filesystem holding the blocks"),
            free: m.gauge("free_bytes", "Free bytes on the filesystem holding the blocks"),
        }
    }

    /// Sets the disk gauges (at each scrape).
    pub(crate) fn refresh(&self, store: &BlockStore) {
        if let Ok((capacity, free)) = store.usage() {
            self.capacity.set(capacity as i64);
            self.free.set(free as i64);
        }
    }
}
