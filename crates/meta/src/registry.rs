//! Chunk servers known to this metadata server, kept alive by their heartbeats.

use cairn_proto::{ChunkServerInfo, ServerId};
use dashmap::DashMap;
use std::time::{Duration, Instant};

struct Entry {
    addr: String,
    zone: String,
    capacity: u64,
    free: u64,
    last_seen: Instant,
}

/// Live view of the chunk servers.
pub(crate) struct Registry {
    servers: DashMap<ServerId, Entry>,
    dead_after: Duration,
}

impl Registry {
    pub(crate) fn new(dead_after: Duration) -> Registry {
        Registry { servers: DashMap::new(), dead_after }
    }

    /// How long a silent server counts as alive.
    pub(crate) fn dead_after(&self) -> Duration {
        self.dead_after
    }

    /// Records a heartbeat; returns true if the server was unknown or had been declared dead.
    pub(crate) fn heartbeat(&self, id: ServerId, addr: String, zone: String, capacity: u64, free: u64) -> bool {
        let now = Instant::now();
        let fresh = self.servers.get(&id).is_none_or(|e| now - e.last_seen > self.dead_after);
        self.servers.insert(id, Entry { addr, zone, capacity, free, last_seen: now });
        fresh
    }

    /// Every known server, with whether it is alive now.
    pub(crate) fn list(&self) -> Vec<ChunkServerInfo> {
        let now = Instant::now();
        let mut v: Vec<_> = self
            .servers
            .iter()
            .map(|e| ChunkServerInfo {
                id: *e.key(),
                addr: e.addr.clone(),
                zone: e.zone.clone(),
                capacity: e.capacity,
                free: e.free,
                alive: now - e.last_seen <= self.dead_after,
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }
}
