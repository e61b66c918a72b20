//! Re-replication: slices left with fewer live copies than the volume's replication factor
//! (a chunk server died, or was down when the slice was written, or a copy was found corrupt)
//! get new copies, made by a live server that fetches the blocks from a surviving holder.
//! Fewest copies first, one slice at a time, working at most half the time so clients are
//! not starved. Copies on a draining server are moved the same way.

use crate::service::{MetaService, chunk_client};
use crate::store::{Batch, reads};
use cairn_net::RpcClient;
use cairn_proto::chunk::{BlockKey, ChunkRequest, ChunkResponse};
use cairn_proto::placement;
use cairn_proto::*;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Slice rows read per page of a scan.
const SCAN_PAGE: i64 = 2048;
/// Deadline of one `Replicate` (a whole slice, up to 16 blocks of 4 MiB).
const REPLICATE_TIMEOUT: Duration = Duration::from_secs(120);
/// Reports of corrupt copies kept between two rounds of the repair loop at most.
const MAX_BAD_QUEUE: usize = 100_000;
/// Time between scans when the live servers stay the same and the last scan left no work (a
/// full scan catches slices written while a server was down even without any server dying).
const IDLE_SCAN: Duration = Duration::from_secs(60);

/// A slice short of copies, or with copies to move off draining servers, as a scan found it.
struct Short {
    slice: SliceId,
    len: u64,
    /// Live holders; the dead ones are dropped from the slice rows once repaired.
    live: Vec<ServerId>,
    /// The live holders that are not draining: they keep their copies.
    kept: Vec<ServerId>,
    /// Copies it should have: the replication factor, or fewer when fewer zones are live.
    want: usize,
}

/// Where the repair loop sends a `cairn gc` run's findings.
type GcReply = tokio::sync::oneshot::Sender<Vec<GcServer>>;

/// The channel `cairn gc` runs reach the repair loop through.
pub(crate) struct GcRequests {
    tx: tokio::sync::mpsc::Sender<GcReply>,
    rx: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<GcReply>>>,
}

impl Default for GcRequests {
    fn default() -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        GcRequests { tx, rx: std::sync::Mutex::new(Some(rx)) }
    }
}

impl GcRequests {
    /// The receiving end, for the one repair loop.
    fn take(&self) -> tokio::sync::mpsc::Receiver<GcReply> {
        self.rx.lock().expect("gc requests lock").take().expect("one repair loop")
    }
}

impl MetaService {
    /// `cairn gc`: the repair loop reconciles every live chunk server at its next turn (after
    /// the repair it may be doing), and the deletion queue is worked off now.
    pub(crate) async fn gc(&self) -> crate::Result<GcReport> {
        self.gc_wakeup.notify_one();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let gone = || crate::MetaError::fs(ErrorCode::Io, "the repair loop is not running");
        self.gc_requests.tx.send(tx).await.map_err(|_| gone())?;
        let servers = rx.await.map_err(|_| gone())?;
        let removed = self.removed.lock().expect("removed lock").len() as u64;
        Ok(GcReport {
            removed,
            queued: crate::store::reads::gc_queued(&self.store.readers).await?,
            grace_secs: self.orphan_grace.as_secs(),
            servers,
        })
    }

    /// Keeps the data placed as it should be, forever, in the background: re-replicates
    /// slices short of copies (and moves those off draining servers); when none is short,
    /// evens out the servers (rebalance); and now and then drops the copies no file
    /// references (reconcile). One task does all three, so they never race each other.
    pub(crate) async fn repair_loop(self: Arc<Self>, endpoint: quinn::Endpoint) {
        let started = Instant::now();
        let mut clients: HashMap<ServerId, RpcClient> = HashMap::new();
        let mut last_scan: Option<Instant> = None;
        // The live servers at the last scan: a scan is due when they change.
        let mut last_alive: Vec<ServerId> = Vec::new();
        let mut work_left = false;
        let mut reconcile = crate::reconcile::Reconciler::default();
        let mut gc_requests = self.gc_requests.take();
        loop {
            let woken = tokio::select! {
                _ = self.repair_wakeup.notified() => true,
                Some(reply) = gc_requests.recv() => {
                    let servers = self.registry.list();
                    let _ = reply.send(reconcile.run_all(&self, &servers, &endpoint, &mut clients).await);
                    continue;
                }
                _ = tokio::time::sleep(Duration::from_secs(2)) => false,
            };
            let servers = self.registry.list();
            // Right after a restart the registry fills as heartbeats arrive: an unknown
            // server is not dead until it has had the time to announce itself.
            if started.elapsed() < self.registry.dead_after() * 2 {
                continue;
            }
            if let Err(e) = self.bad_copies().await {
                warn!("repair: handling reports of corrupt copies: {e}");
            }
            reconcile.run_due(&self, &servers, &endpoint, &mut clients).await;
            let alive: Vec<ServerId> = servers.iter().filter(|s| s.alive).map(|s| s.id).collect();
            let changed = alive != last_alive;
            if !(changed || woken || work_left || last_scan.is_none_or(|t| t.elapsed() > IDLE_SCAN)) {
                continue;
            }
            last_scan = Some(Instant::now());
            last_alive = alive;
            let scan = match self.scan(&servers).await {
                Ok(s) => s,
                Err(e) => {
                    warn!("repair: scanning slices: {e}");
                    continue;
                }
            };
            work_left = false;
            for s in &scan.short {
                let t0 = Instant::now();
                match self.repair_slice(s, &servers, &endpoint, &mut clients).await {
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
            if scan.short.is_empty() {
                match self.rebalance(&servers, &scan.held, &endpoint, &mut clients).await {
                    Ok(moved) => work_left = moved,
                    Err(e) => warn!("rebalance: {e}"),
                }
            }
        }
    }

    /// Every slice with fewer live copies than it should have, or with a copy on a draining
    /// server, fewest copies first; updates the counters `cairn status` shows.
    async fn scan(&self, servers: &[ChunkServerInfo]) -> crate::Result<Scan> {
        let alive: HashMap<ServerId, &ChunkServerInfo> =
            servers.iter().filter(|s| s.alive).map(|s| (s.id, s)).collect();
        let zones: HashSet<&str> = alive.values().filter(|s| !s.draining).map(|s| s.zone.as_str()).collect();
        let want = (self.volume.replication as usize).min(zones.len()).max(1);
        let mut seen = HashSet::new();
        let (mut short, mut lost, mut held) = (Vec::new(), 0u64, HashMap::new());
        let mut after = 0;
        loop {
            let page = reads::slice_holders(&self.store.readers, after, SCAN_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.0;
            for (_, slice, len, holders) in page {
                if !seen.insert(slice) {
                    continue;
                }
                for h in &holders {
                    let e: &mut (u64, u64) = held.entry(*h).or_default();
                    *e = (e.0 + 1, e.1 + len);
                }
                let live: Vec<_> = holders.iter().copied().filter(|h| alive.contains_key(h)).collect();
                let kept: Vec<_> = live.iter().copied().filter(|h| !alive[h].draining).collect();
                if live.is_empty() {
                    lost += 1;
                } else if kept.len() < want || kept.len() < live.len() {
                    short.push(Short { slice, len, live, kept, want });
                }
            }
        }
        short.sort_by_key(|s| (s.kept.len(), s.slice));
        self.repair_stats.short.store(short.len() as u64, Ordering::Relaxed);
        if self.repair_stats.lost.swap(lost, Ordering::Relaxed) != lost && lost > 0 {
            error!(slices = lost, "repair: slices with no live copy (their servers are down or gone)");
        }
        let before = self.repair_stats.copies.swap(want as u64, Ordering::Relaxed);
        if want < self.volume.replication as usize && before != want as u64 {
            warn!(
                replication = self.volume.replication,
                zones = zones.len(),
                "fewer live failure domains than the replication factor: blocks get {want} copies"
            );
        }
        self.registry.set_held(held.clone());
        self.repair_stats.scans.fetch_add(1, Ordering::Relaxed);
        Ok(Scan { short, held })
    }

    /// Adds copies of one slice until it has as many as it should, on the servers placement
    /// picks around the holders it keeps, and drops its draining holders; false if nothing
    /// could be done now.
    async fn repair_slice(
        &self,
        s: &Short,
        servers: &[ChunkServerInfo],
        endpoint: &quinn::Endpoint,
        clients: &mut HashMap<ServerId, RpcClient>,
    ) -> crate::Result<bool> {
        let mut holders = s.kept.clone();
        for id in placement::place(servers, s.slice, s.want, s.len, &s.kept) {
            // Copy from a live holder, one that stays if there is one.
            let from = s.kept.first().or(s.live.first()).copied().unwrap_or_default();
            if self.copy_slice(s.slice, s.len, from, id, servers, endpoint, clients).await {
                holders.push(id);
            }
        }
        // Dropping a draining holder must not leave fewer copies than there were, unless
        // there were more than the replication factor.
        let floor = s.live.len().min(self.volume.replication as usize);
        if holders.len() < floor || holders == s.live {
            return Ok(false);
        }
        self.set_holders(s.slice, &holders).await?;
        let counter = if s.kept.len() < s.live.len() { &self.repair_stats.moved } else { &self.repair_stats.repaired };
        counter.fetch_add(1, Ordering::Relaxed);
        info!(slice = s.slice, from = ?s.live, to = ?holders, "repair: slice copied");
        Ok(true)
    }

    /// Has server `to` fetch every block of a slice from server `from`; false (and a warning)
    /// if that failed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn copy_slice(
        &self,
        slice: SliceId,
        len: u64,
        from: ServerId,
        to: ServerId,
        servers: &[ChunkServerInfo],
        endpoint: &quinn::Endpoint,
        clients: &mut HashMap<ServerId, RpcClient>,
    ) -> bool {
        let (Some(source), Some(target)) = (servers.iter().find(|x| x.id == from), servers.iter().find(|x| x.id == to))
        else {
            return false;
        };
        let keys: Vec<BlockKey> =
            (0..len.div_ceil(self.volume.block_size).max(1) as u32).map(|index| BlockKey { slice, index }).collect();
        let client = chunk_client(clients, endpoint, target, REPLICATE_TIMEOUT);
        let req = ChunkRequest::Replicate { keys, from: source.addr.clone() };
        match client.call::<_, ChunkResponse>(&req).await {
            Ok(_) => true,
            Err(e) => {
                warn!(slice, from, to, "copying a slice failed: {e}");
                false
            }
        }
    }

    /// Records the servers holding a slice.
    pub(crate) async fn set_holders(&self, slice: SliceId, holders: &[ServerId]) -> crate::Result<()> {
        let mut b = Batch::default();
        b.set_slice_servers(slice, holders);
        self.store.write().await?.apply(b).await?;
        Ok(())
    }

    /// A chunk server found corrupt blocks of these slices: queued for the repair loop, the
    /// one task that changes slices' holders.
    pub(crate) fn report_bad_copies(&self, server: ServerId, slices: &[SliceId]) {
        if slices.is_empty() {
            return;
        }
        let mut q = self.bad_reports.lock().expect("bad reports lock");
        let room = MAX_BAD_QUEUE.saturating_sub(q.len());
        q.extend(slices.iter().take(room).map(|s| (server, *s)));
        drop(q);
        self.repair_wakeup.notify_one();
    }

    /// Handles the queued reports of corrupt copies: a reported copy stops counting (the scan
    /// that follows makes a new one from a good copy, possibly on the same server) as long as
    /// another live copy exists; otherwise it stays, and the loss is logged.
    async fn bad_copies(&self) -> crate::Result<()> {
        let reports = std::mem::take(&mut *self.bad_reports.lock().expect("bad reports lock"));
        let servers = self.registry.list();
        for (server, slice) in reports {
            let Some(holders) = reads::slice_servers(&self.store.readers, slice).await? else { continue };
            if !holders.contains(&server) {
                continue;
            }
            let others: Vec<_> = holders.iter().copied().filter(|h| *h != server).collect();
            if !others.iter().any(|h| servers.iter().any(|s| s.id == *h && s.alive)) {
                error!(slice, server, "a copy is corrupt and no other live copy exists: reads of it fail with EIO");
                continue;
            }
            self.set_holders(slice, &others).await?;
            self.repair_stats.bad.fetch_add(1, Ordering::Relaxed);
            warn!(slice, server, "a copy is corrupt: making a new one from a good copy");
        }
        Ok(())
    }

    /// `cairn chunk drain`: a draining server gets no new copies and the repair loop moves
    /// its copies elsewhere; kept in the database so a restart goes on with it.
    pub(crate) async fn drain(&self, id: ServerId, drain: bool) -> crate::Result<()> {
        if drain && !self.registry.list().iter().any(|s| s.id == id) {
            return Err(crate::MetaError::fs(ErrorCode::NotFound, format!("no chunk server {id} is registered")));
        }
        let list = self.registry.set_draining(id, drain);
        let mut b = Batch::default();
        b.set_volume_setting(crate::service::DRAINING_SETTING, crate::store::servers_to_text(&list));
        self.store.write().await?.apply(b).await?;
        info!(id, drain, "chunk server drain changed");
        self.repair_wakeup.notify_one();
        Ok(())
    }
}

/// What a scan found.
struct Scan {
    short: Vec<Short>,
    /// `(slices, bytes)` recorded on each server.
    held: HashMap<ServerId, (u64, u64)>,
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
    /// Slices moved to another server (drain, rebalance).
    pub(crate) moved: std::sync::atomic::AtomicU64,
    /// Corrupt copies reported by chunk servers.
    pub(crate) bad: std::sync::atomic::AtomicU64,
    /// Orphaned slices deleted by reconciliation.
    pub(crate) orphans: std::sync::atomic::AtomicU64,
    /// Scans finished.
    pub(crate) scans: std::sync::atomic::AtomicU64,
    /// Copies per slice at the last scan (for logging a change only).
    copies: std::sync::atomic::AtomicU64,
}
