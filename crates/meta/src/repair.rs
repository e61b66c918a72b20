//! Re-replication: slices left with fewer live copies than the volume's replication factor
//! (a chunk server died, or was down when the slice was written) get new copies, made by a
//! live server that fetches the blocks from a surviving holder. Fewest copies first, one
//! slice at a time, working at most half the time so clients are not starved.

use crate::service::{MetaService, chunk_client};
use crate::store::{Batch, reads};
use cairn_net::RpcClient;
use cairn_proto::chunk::{BlockKey, ChunkRequest, ChunkResponse};
use cairn_proto::placement;
use cairn_proto::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Slice rows read per page of a scan.
const SCAN_PAGE: i64 = 2048;
/// Deadline of one `Replicate` (a whole slice, up to 16 blocks of 4 MiB).
const REPLICATE_TIMEOUT: Duration = Duration::from_secs(120);
/// Time between scans when the live servers stay the same and the last scan left no work (a
/// full scan catches slices written while a server was down even without any server dying).
const IDLE_SCAN: Duration = Duration::from_secs(60);

/// A slice short of copies, as a scan found it.
struct Short {
    slice: SliceId,
    len: u64,
    /// Live holders; the dead ones are dropped from the slice rows once repaired.
    live: Vec<ServerId>,
    /// Copies it should have: the replication factor, or fewer when fewer zones are live.
    want: usize,
}

impl MetaService {
    /// Scans for under-replicated slices and repairs them, forever, in the background.
    pub(crate) async fn repair_loop(self: Arc<Self>, endpoint: quinn::Endpoint) {
        let started = Instant::now();
        let mut clients: HashMap<ServerId, RpcClient> = HashMap::new();
        let mut last_scan: Option<Instant> = None;
        // The live servers at the last scan: a scan is due when they change.
        let mut last_alive: Vec<ServerId> = Vec::new();
        let mut work_left = false;
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let servers = self.registry.list();
            // Right after a restart the registry fills as heartbeats arrive: an unknown
            // server is not dead until it has had the time to announce itself.
            if started.elapsed() < self.registry.dead_after() * 2 {
                continue;
            }
            let alive: Vec<ServerId> = servers.iter().filter(|s| s.alive).map(|s| s.id).collect();
            let changed = alive != last_alive;
            if !(changed || work_left || last_scan.is_none_or(|t| t.elapsed() > IDLE_SCAN)) {
                continue;
            }
            last_scan = Some(Instant::now());
            last_alive = alive;
            let short = match self.scan_short(&servers).await {
                Ok(s) => s,
                Err(e) => {
                    warn!("repair: scanning slices: {e}");
                    continue;
                }
            };
            work_left = false;
            for s in short {
                let t0 = Instant::now();
                match self.repair_slice(&s, &servers, &endpoint, &mut clients).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        warn!(slice = s.slice, "repair: {e}");
                        continue;
                    }
                }
                work_left = true;
                // Work at most half the time.
                tokio::time::sleep(t0.elapsed()).await;
            }
        }
    }

    /// Every slice with fewer live copies than it should have, fewest first; updates the
    /// counters `cairn status` shows.
    async fn scan_short(&self, servers: &[ChunkServerInfo]) -> crate::Result<Vec<Short>> {
        let alive: HashMap<ServerId, &ChunkServerInfo> =
            servers.iter().filter(|s| s.alive).map(|s| (s.id, s)).collect();
        let zones: std::collections::HashSet<&str> = alive.values().map(|s| s.zone.as_str()).collect();
        let want = (self.volume.replication as usize).min(zones.len()).max(1);
        let mut seen = std::collections::HashSet::new();
        let (mut short, mut lost) = (Vec::new(), 0u64);
        let mut after = 0;
        loop {
            let page = reads::slice_holders(&self.store.readers, after, SCAN_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.0;
            for (_, slice, len, holders) in page {
                if !seen.insert(slice) {
                    continue;
                }
                let live: Vec<_> = holders.iter().copied().filter(|h| alive.contains_key(h)).collect();
                if live.is_empty() {
                    lost += 1;
                } else if live.len() < want {
                    short.push(Short { slice, len, live, want });
                }
            }
        }
        short.sort_by_key(|s| (s.live.len(), s.slice));
        self.repair_stats.short.store(short.len() as u64, Ordering::Relaxed);
        if self.repair_stats.lost.swap(lost, Ordering::Relaxed) != lost && lost > 0 {
            error!(slices = lost, "repair: slices with no live copy (their servers are down or gone)");
        }
        Ok(short)
    }

    /// Adds copies of one slice until it has as many as it should, on the servers placement
    /// picks around its live holders; false if none could take a copy now.
    async fn repair_slice(
        &self,
        s: &Short,
        servers: &[ChunkServerInfo],
        endpoint: &quinn::Endpoint,
        clients: &mut HashMap<ServerId, RpcClient>,
    ) -> crate::Result<bool> {
        let from = servers.iter().find(|x| x.id == s.live[0]).map(|x| x.addr.clone()).unwrap_or_default();
        let keys: Vec<BlockKey> = (0..s.len.div_ceil(self.volume.block_size).max(1) as u32)
            .map(|index| BlockKey { slice: s.slice, index })
            .collect();
        let mut holders = s.live.clone();
        for id in placement::place(servers, s.slice, s.want, s.len, &s.live) {
            let Some(target) = servers.iter().find(|x| x.id == id) else { continue };
            let client = chunk_client(clients, endpoint, target, REPLICATE_TIMEOUT);
            let req = ChunkRequest::Replicate { keys: keys.clone(), from: from.clone() };
            match client.call::<_, ChunkResponse>(&req, &[]).await {
                Ok(_) => holders.push(id),
                Err(e) => warn!(slice = s.slice, server = id, "repair: copying a slice failed: {e}"),
            }
        }
        if holders.len() == s.live.len() {
            return Ok(false);
        }
        let mut b = Batch::default();
        b.set_slice_servers(s.slice, &holders);
        self.store.write().await?.apply(b).await?;
        self.repair_stats.repaired.fetch_add(1, Ordering::Relaxed);
        info!(slice = s.slice, from = ?s.live, to = ?holders, "repair: slice re-replicated");
        Ok(true)
    }
}

/// Progress of re-replication, for `cairn status`.
#[derive(Default)]
pub(crate) struct RepairStats {
    /// Slices found short of copies by the last scan.
    pub(crate) short: std::sync::atomic::AtomicU64,
    /// Slices with no live copy at the last scan.
    pub(crate) lost: std::sync::atomic::AtomicU64,
    /// Slices given new copies since the server started.
    pub(crate) repaired: std::sync::atomic::AtomicU64,
}
