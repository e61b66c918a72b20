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
    /// Servers being drained (kept in the database, see `MetaService::drain`).
    draining: std::sync::Mutex<Vec<ServerId>>,
    /// `(slices, bytes)` recorded on each server at the last repair scan.
    held: DashMap<ServerId, (u64, u64)>,
}

impl Registry {
    pub(crate) fn new(dead_after: Duration, draining: Vec<ServerId>) -> Registry {
        Registry { servers: DashMap::new(), dead_after, draining: draining.into(), held: DashMap::new() }
    }

    /// Marks a server as draining or not; returns the new list of draining servers.
    pub(crate) fn set_draining(&self, id: ServerId, drain: bool) -> Vec<ServerId> {
        let mut d = self.draining.lock().expect("draining lock");
        d.retain(|x| *x != id);
        if drain {
            d.push(id);
        }
        d.clone()
    }

    /// Records what the last scan found on each server.
    pub(crate) fn set_held(&self, held: std::collections::HashMap<ServerId, (u64, u64)>) {
        self.held.retain(|id, _| held.contains_key(id));
        for (id, h) in held {
            self.held.insert(id, h);
        }
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
        let draining = self.draining.lock().expect("draining lock").clone();
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
                draining: draining.contains(e.key()),
                slices: self.held.get(e.key()).map_or(0, |h| h.0),
                bytes: self.held.get(e.key()).map_or(0, |h| h.1),
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }
}
