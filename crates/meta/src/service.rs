//! Request dispatch, the server's run loop and its background tasks.

use crate::data::Commit;
use crate::error::MetaError;
use crate::locks::{LockRequest, Owner};
use crate::opens::Opens;
use crate::registry::Registry;
use crate::store::{Batch, Store};
use cairn_net::{Handler, Identity, Peer, RpcClient};
use cairn_proto::chunk::{BlockKey, ChunkRequest, ChunkResponse};
use cairn_proto::meta::{DeferredChange, LockKind, MetaRequest, MetaResponse};
use cairn_proto::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{info, warn};

/// What `cairn meta` needs to run.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    pub listen: SocketAddr,
    pub db: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A chunk server silent for this long is considered dead.
    pub dead_after: Duration,
    /// The volume key file (see `cairn_config::load_keys`), read again at every client's
    /// hello so a rotated key reaches clients that connect afterwards.
    pub key_file: PathBuf,
    /// How long a slice stored where no file references it is kept (reconciliation).
    pub orphan_grace: Duration,
    /// How long a restarted server waits for clients to reclaim their locks (see `locks`).
    pub lock_grace: Duration,
    /// Imbalance in bytes that starts the rebalancer; 0 turns it off.
    pub rebalance_threshold: u64,
    /// TCP address serving Prometheus metrics at `/metrics`; none serves none.
    pub metrics: Option<SocketAddr>,
}

/// The metadata service state shared by all connections.
pub struct MetaService {
    pub(crate) store: Store,
    pub(crate) volume: VolumeInfo,
    key_file: PathBuf,
    pub(crate) orphan_grace: Duration,
    pub(crate) rebalance_threshold: u64,
    pub(crate) opens: Opens,
    pub(crate) registry: Registry,
    pub(crate) leases: crate::leases::Leases,
    /// The solo lease (see `solo`).
    solo: crate::solo::Solo,
    /// File locks of every client, in memory only (see `locks`).
    pub(crate) locks: crate::locks::Locks,
    /// The lowest write lease epoch granted since this start: the start's count (kept
    /// durably) times 2^32. A power cut can take back the last grants and revocations, which
    /// are not synced; counting on from the epochs left would hand one out again, and its
    /// earlier holder's commits would pass the fence.
    pub(crate) lease_floor: u64,
    /// Whether the database says locks may be held ([`LOCKS_SETTING`]), so that a restart
    /// gives their holders a grace period to reclaim them; and how many locks were asked for.
    locks_recorded: tokio::sync::Mutex<(bool, u64)>,
    pub(crate) repair_stats: crate::repair::RepairStats,
    /// Wakes the repair loop for a scan now (a corrupt copy was reported, a drain started).
    pub(crate) repair_wakeup: Notify,
    /// Corrupt copies reported by chunk servers, `(server, slice)`, for the repair loop.
    pub(crate) bad_reports: std::sync::Mutex<Vec<(ServerId, SliceId)>>,
    pub(crate) gc_wakeup: Notify,
    /// `cairn gc` runs, for the repair loop (which owns reconciliation), each with where to
    /// send its report.
    pub(crate) gc_requests: crate::repair::GcRequests,
    /// Inodes that lost their last link while nothing had them open, with when to free them.
    pub(crate) removed: std::sync::Mutex<std::collections::VecDeque<(Ino, tokio::time::Instant)>>,
    pub(crate) removed_wakeup: Notify,
    /// Requests by kind and the server's state, for Prometheus (see `metrics`).
    metrics: Arc<cairn_metrics::Metrics>,
    pub(crate) gauges: crate::metrics::MetaGauges,
    /// Commits waiting for the writer (see `group_commit`).
    pub(crate) commits: crate::group_commit::CommitQueue,
}

impl MetaService {
    /// Opens the service on an already formatted store.
    pub async fn new(store: Store, config: &MetaConfig) -> crate::Result<MetaService> {
        let volume = store.volume().await?;
        let draining = crate::store::reads::volume_setting(&store.readers, DRAINING_SETTING).await?;
        let draining = draining.map(|d| crate::store::servers_from_text(&d)).unwrap_or_default();
        let locks_recorded = crate::store::reads::volume_setting(&store.readers, LOCKS_SETTING).await?;
        let locks_recorded = locks_recorded.as_deref() == Some("1");
        let lock_grace = if locks_recorded { config.lock_grace } else { Duration::ZERO };
        if !lock_grace.is_zero() {
            info!("granting only reclaimed locks for {lock_grace:?}: clients may have held locks before this start");
        }
        let boot = {
            let mut b = Batch::durable(true);
            b.count_boot();
            store.write().await?.apply(b).await?.value()? as u64
        };
        let mut metrics = cairn_metrics::Metrics::new("cairn_meta");
        let gauges = crate::metrics::MetaGauges::register(&mut metrics);
        let svc = MetaService {
            metrics: Arc::new(metrics),
            gauges,
            commits: Default::default(),
            store,
            volume,
            key_file: config.key_file.clone(),
            orphan_grace: config.orphan_grace,
            rebalance_threshold: config.rebalance_threshold,
            opens: Opens::default(),
            registry: Registry::new(config.dead_after, draining),
            leases: Default::default(),
            solo: Default::default(),
            locks: crate::locks::Locks::new(lock_grace),
            lease_floor: boot << 32,
            locks_recorded: tokio::sync::Mutex::new((locks_recorded, 0)),
            repair_stats: Default::default(),
            repair_wakeup: Notify::new(),
            bad_reports: Default::default(),
            gc_wakeup: Notify::new(),
            gc_requests: Default::default(),
            removed: Default::default(),
            removed_wakeup: Notify::new(),
        };
        svc.purge_orphans().await?;
        Ok(svc)
    }

    async fn dispatch(&self, peer: &Peer, req: MetaRequest) -> crate::Result<MetaResponse> {
        use MetaResponse as R;
        let conn = peer.conn_id;
        Ok(match req {
            MetaRequest::Hello { version, volume } => {
                if version != PROTOCOL_VERSION {
                    return Err(MetaError::fs(
                        ErrorCode::Mismatch,
                        format!("protocol version {version} unsupported (server speaks {PROTOCOL_VERSION})"),
                    ));
                }
                if volume != self.volume.name {
                    return Err(MetaError::fs(
                        ErrorCode::NotFound,
                        format!("no volume {volume:?} here (this server holds {:?})", self.volume.name),
                    ));
                }
                let keys = match self.volume.encrypted && peer.is_client {
                    true => self.keys()?,
                    false => Vec::new(),
                };
                R::Hello { volume: self.volume.clone(), keys }
            }
            MetaRequest::Lookup { parent, name } => R::Attr(self.lookup(parent, &name).await?),
            MetaRequest::GetAttr { ino } => R::Attr(self.getattr(ino).await?),
            MetaRequest::SetAttr { ino, set, caller: _ } => {
                R::Attr(self.setattr(ino, &set, !self.leases.holds_write(ino, conn)).await?)
            }
            MetaRequest::MakeNode { parent, name, kind, perm, rdev, target, caller, umask, open } => {
                let (attr, dirs) = self
                    .make_node(conn, parent, &name, kind, perm & !umask, perm, rdev, target, &caller, open, None)
                    .await?;
                R::Changed { attr: Some(attr), dirs: dirs.0, unnamed: Vec::new() }
            }
            MetaRequest::Link { ino, new_parent, new_name } => {
                let (attr, dirs) = self.link(ino, new_parent, &new_name).await?;
                R::Changed { attr: Some(attr), dirs: dirs.0, unnamed: Vec::new() }
            }
            MetaRequest::Unlink { parent, name } => {
                let (dirs, unnamed) = self.unlink(parent, &name, Timestamp::now()).await?;
                R::Changed { attr: None, dirs: dirs.0, unnamed }
            }
            MetaRequest::Rmdir { parent, name } => {
                let (dirs, unnamed) = self.rmdir(parent, &name, Timestamp::now()).await?;
                R::Changed { attr: None, dirs: dirs.0, unnamed }
            }
            MetaRequest::Rename { parent, name, new_parent, new_name, mode } => {
                let (dirs, unnamed) = self.rename(parent, &name, new_parent, &new_name, mode, Timestamp::now()).await?;
                R::Changed { attr: None, dirs: dirs.0, unnamed }
            }
            MetaRequest::ReadLink { ino } => R::Link(self.readlink(ino).await?),
            MetaRequest::ReadDir { ino, after, limit, plus } => R::Dir(self.readdir(ino, after, limit, plus).await?),
            MetaRequest::Open { ino } => {
                let (attr, first_map) = self.open(conn, ino).await?;
                R::Opened { attr, first_map }
            }
            MetaRequest::Close { ino } => {
                self.close(conn, ino);
                R::Empty
            }
            MetaRequest::ReadMap { ino, chunk } => {
                let (slices, seq) = self.read_map(ino, chunk).await?;
                R::Map { slices, seq }
            }
            MetaRequest::AllocSlices { count } => R::SliceIds { first: self.alloc_slices(count).await? },
            MetaRequest::Commit { ino, slices, min_size, durable, lease, written_at, attrs } => {
                let written_at = written_at.unwrap_or_else(Timestamp::now);
                let commit = Commit { slices: &slices, min_size, durable, lease, written_at, attrs: attrs.as_ref() };
                let (attr, first_map) = self.commit(conn, ino, commit).await?;
                R::Committed { attr, first_map }
            }
            MetaRequest::WriteLease { ino } => {
                let (epoch, attr) = self.write_lease(conn, ino).await?;
                R::Lease { epoch, attr }
            }
            MetaRequest::Compact { ino, chunk, seq, slice } => {
                self.compact(ino, chunk, seq, &slice).await?;
                R::Empty
            }
            MetaRequest::Touch { times } => {
                self.touch(&times).await?;
                R::Empty
            }
            MetaRequest::Sync => {
                self.sync().await?;
                R::Empty
            }
            MetaRequest::Fallocate { ino, mode, offset, len, caller } => {
                R::Attr(self.fallocate(ino, mode, offset, len, &caller, !self.leases.holds_write(ino, conn)).await?)
            }
            MetaRequest::SetXattr { ino, name, value, mode, caller } => {
                self.set_xattr(ino, &name, &value, mode, &caller).await?;
                R::Empty
            }
            MetaRequest::GetXattr { ino, name } => R::Xattr(self.get_xattr(ino, &name).await?),
            MetaRequest::ListXattr { ino } => R::XattrNames(self.list_xattr(ino).await?),
            MetaRequest::RemoveXattr { ino, name } => {
                self.remove_xattr(ino, &name).await?;
                R::Empty
            }
            MetaRequest::StatFs => R::StatFs(self.statfs().await?),
            MetaRequest::Renew => R::Empty,
            MetaRequest::ListServers => R::Servers(self.registry.list()),
            MetaRequest::Heartbeat { id, addr, zone, capacity, free, bad } => {
                if self.registry.heartbeat(id, addr.clone(), zone.clone(), capacity, free) {
                    info!(id, %addr, %zone, "chunk server joined");
                }
                self.report_bad_copies(id, &bad);
                R::Empty
            }
            MetaRequest::Drain { id, drain } => {
                self.drain(id, drain).await?;
                R::Empty
            }
            MetaRequest::Fsck => R::Fsck(self.fsck().await?),
            MetaRequest::Gc => R::Gc(self.gc().await?),
            MetaRequest::GetLock { ino, owner, start, end, kind } => {
                check_range(start, end)?;
                R::Lock(self.locks.get(ino, Owner { conn, id: owner }, start, end, kind).map_err(lock_error)?)
            }
            MetaRequest::SetLock { ino, owner, start, end, kind, pid, flock, wait_ms } => {
                check_range(start, end)?;
                if kind != LockKind::Unlock {
                    self.record_locks().await?;
                }
                let req = LockRequest { ino, owner: Owner { conn, id: owner }, start, end, kind, pid, flock };
                let wait = Duration::from_millis(wait_ms.into());
                R::LockHeld(self.locks.set(&req, wait).await.map_err(lock_error)?)
            }
            MetaRequest::ReclaimLocks { locks } => {
                let got = self.locks.reclaim(conn, &locks);
                let lost = got.iter().filter(|g| !**g).count();
                if lost > 0 {
                    warn!(
                        conn,
                        lost,
                        "refused to give back locks a client held before (outside the grace period, or in conflict)"
                    );
                }
                R::Reclaimed(got)
            }
            MetaRequest::Solo => R::Solo(self.solo.grant(conn, || self.leases.alone(conn))),
            MetaRequest::ReserveInodes { count } => R::Inodes { first: self.reserve_inodes(count).await? },
            MetaRequest::Deferred { epoch, first, changes } => {
                R::Applied(self.apply_deferred(peer, epoch, first, changes).await?)
            }
        })
    }

    /// Reserves inode numbers for a client's deferred creations: the database's counter
    /// moves past them, so the server never hands them out itself.
    async fn reserve_inodes(&self, count: u32) -> crate::Result<Ino> {
        let mut b = Batch::durable(true);
        b.reserve_inodes(u64::from(count.clamp(1, 1 << 16)));
        Ok(self.store.write().await?.apply(b).await?.value()? as Ino)
    }

    /// Applies namespace changes made under the solo lease (see `solo`), each as its own
    /// request would have been, at the time and with the inode number the client gave it.
    async fn apply_deferred(
        &self,
        peer: &Peer,
        epoch: u64,
        first: u64,
        changes: Vec<DeferredChange>,
    ) -> crate::Result<Vec<(u64, WireError)>> {
        let Some(done) = self.solo.accept(peer.conn_id, epoch, first) else {
            return Err(MetaError::fs(ErrorCode::LeaseLost, "the solo lease these changes were made under has ended"));
        };
        let mut failed = Vec::new();
        for (n, change) in (first..).zip(changes).skip(done as usize) {
            let r = self.apply_change(peer, change).await;
            self.solo.applied(epoch, n);
            if let Err(e) = r {
                warn!(conn = peer.conn_id, "a deferred change failed: {e}");
                failed.push((n, e.into()));
            }
        }
        Ok(failed)
    }

    async fn apply_change(&self, peer: &Peer, change: DeferredChange) -> crate::Result<()> {
        let DeferredChange { at, ino, req } = change;
        let conn = peer.conn_id;
        // Leases as if the request had come then: the holder caches what it answered itself.
        self.leases.grant(peer, &req.read_inodes());
        match req {
            MetaRequest::MakeNode { parent, name, kind, perm, rdev, target, caller, umask, open } => {
                let deferred = Some((at, ino));
                self.make_node(conn, parent, &name, kind, perm & !umask, perm, rdev, target, &caller, open, deferred)
                    .await?;
                self.leases.grant(peer, &[ino]);
            }
            MetaRequest::Unlink { parent, name } => drop(self.unlink(parent, &name, at).await?),
            MetaRequest::Rmdir { parent, name } => drop(self.rmdir(parent, &name, at).await?),
            MetaRequest::Rename { parent, name, new_parent, new_name, mode } => {
                drop(self.rename(parent, &name, new_parent, &new_name, mode, at).await?)
            }
            // Only registered: under the solo lease nothing could have unlinked the file
            // since the client learnt of it (its own unlinks come after in the queue).
            MetaRequest::Open { ino } => self.opens.open(conn, ino),
            MetaRequest::Close { ino } => self.close(conn, ino),
            // With the client's time, as it answered.
            MetaRequest::SetAttr { ino, mut set, caller: _ } => {
                set.atime = set.atime.map(|t| TimeSet::At(t.resolve(at)));
                set.mtime = set.mtime.map(|t| TimeSet::At(t.resolve(at)));
                set.ctime.get_or_insert(at);
                self.setattr(ino, &set, false).await?;
            }
            other => {
                let what: &str = (&other).into();
                return Err(MetaError::fs(ErrorCode::BadRequest, format!("{what} cannot be deferred")));
            }
        }
        Ok(())
    }

    /// The volume keys, for an encrypted volume's clients.
    fn keys(&self) -> crate::Result<Vec<(u16, [u8; 32])>> {
        cairn_config::load_keys(&self.key_file).map_err(|e| {
            tracing::error!("cannot give clients the volume keys: {e}");
            MetaError::fs(ErrorCode::Io, format!("the metadata server cannot read the volume keys: {e}"))
        })
    }

    async fn statfs(&self) -> crate::Result<FsStats> {
        let files = crate::store::reads::inode_count(&self.store.readers).await?;
        let (capacity, free) = self.space();
        let r = &self.repair_stats;
        let [short_slices, lost_slices, repaired_slices, moved_slices, bad_copies, orphans_deleted, scans] =
            [&r.short, &r.lost, &r.repaired, &r.moved, &r.bad, &r.orphans, &r.scans]
                .map(|c| c.load(std::sync::atomic::Ordering::Relaxed));
        Ok(FsStats {
            capacity,
            free,
            files,
            short_slices,
            lost_slices,
            repaired_slices,
            moved_slices,
            bad_copies,
            orphans_deleted,
            scans,
        })
    }

    /// Capacity and free bytes of the volume: the live chunk servers' space divided by the
    /// number of copies each block takes.
    pub(crate) fn space(&self) -> (u64, u64) {
        let alive: Vec<_> = self.registry.list().into_iter().filter(|s| s.alive).collect();
        let r = u64::from(self.volume.replication.max(1)).min(alive.len().max(1) as u64);
        (alive.iter().map(|s| s.capacity).sum::<u64>() / r, alive.iter().map(|s| s.free).sum::<u64>() / r)
    }

    /// Free bytes of the volume (see [`MetaService::space`]).
    pub(crate) fn free_bytes(&self) -> u64 {
        self.space().1
    }

    /// Deletes the blocks of unreferenced slices, forever, in the background.
    async fn gc_loop(self: Arc<Self>, endpoint: quinn::Endpoint) {
        let mut clients: HashMap<ServerId, RpcClient> = HashMap::new();
        loop {
            tokio::select! {
                _ = self.gc_wakeup.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
            let started = tokio::time::Instant::now();
            let batch = match self.gc_batch(512).await {
                Ok(b) if b.is_empty() => continue,
                Ok(b) => b,
                Err(e) => {
                    warn!("gc: {e}");
                    continue;
                }
            };
            let servers = self.registry.list();
            let mut per_server: HashMap<ServerId, Vec<BlockKey>> = HashMap::new();
            for (slice, blocks, holders) in &batch {
                for s in holders {
                    per_server
                        .entry(*s)
                        .or_default()
                        .extend((0..*blocks).map(|index| BlockKey { slice: *slice, index }));
                }
            }
            let mut done = true;
            for (id, keys) in per_server {
                // A server that is down keeps its copies until reconciliation, when it is back,
                // finds that nothing references them.
                let Some(info) = servers.iter().find(|s| s.id == id && s.alive) else { continue };
                let client = chunk_client(&mut clients, &endpoint, info, Duration::from_secs(30));
                for part in keys.chunks(4096) {
                    let r: Result<(ChunkResponse, Vec<u8>), _> =
                        client.call(&ChunkRequest::Delete { keys: part.to_vec() }).await;
                    if let Err(e) = r {
                        warn!(server = id, "gc: {e}");
                        done = false;
                    }
                }
            }
            if done {
                let ids: Vec<_> = batch.iter().map(|(s, _, _)| *s).collect();
                if let Err(e) = self.gc_done(&ids).await {
                    warn!("gc: {e}");
                }
                // A backlog (after an `rm -rf`) is worked off at most half the time, so that
                // clients' requests and the chunk servers' disks are not starved meanwhile.
                tokio::time::sleep(started.elapsed()).await;
                self.gc_wakeup.notify_one();
            } else {
                // Retry later: a live holder failed.
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

/// A refused lock request, with its reason.
fn lock_error(code: ErrorCode) -> MetaError {
    let why = match code {
        ErrorCode::Deadlock => "waiting for this lock would deadlock",
        ErrorCode::Grace => "the metadata server restarted and waits for clients to reclaim their locks",
        _ => "the range is locked by another owner",
    };
    MetaError::fs(code, why)
}

impl MetaService {
    /// Records in the database, before the first lock is granted, that locks may be held,
    /// so that a restart waits for their holders to reclaim them.
    async fn record_locks(&self) -> crate::Result<()> {
        let mut rec = self.locks_recorded.lock().await;
        rec.1 += 1;
        if !rec.0 {
            self.set_locks_record(true).await?;
            rec.0 = true;
        }
        Ok(())
    }

    /// Clears the record of [`MetaService::record_locks`] once no lock is held and none was
    /// asked for since `asked` (the count this returned last time): a lock asked for before
    /// that is granted or refused within one wait round, far sooner than the next check.
    async fn forget_locks_record(&self, asked: u64) -> u64 {
        let mut rec = self.locks_recorded.lock().await;
        if rec.0 && rec.1 == asked && self.locks.idle() {
            match self.set_locks_record(false).await {
                Ok(()) => rec.0 = false,
                Err(e) => warn!("cannot record that no lock is held: {e}"),
            }
        }
        rec.1
    }

    async fn set_locks_record(&self, held: bool) -> crate::Result<()> {
        let mut b = Batch::default();
        b.set_volume_setting(LOCKS_SETTING, if held { "1" } else { "0" }.to_string());
        self.store.write().await?.apply(b).await.map(drop)
    }
}

/// The volume setting saying whether clients may hold locks ("1") or not.
const LOCKS_SETTING: &str = "locks_held";

/// Refuses a lock range that ends before it starts.
fn check_range(start: u64, end: u64) -> crate::Result<()> {
    match start <= end {
        true => Ok(()),
        false => Err(MetaError::fs(ErrorCode::Invalid, format!("lock range {start}..={end} is empty"))),
    }
}

/// The volume setting listing the servers being drained.
pub(crate) const DRAINING_SETTING: &str = "draining";

/// The connection to a chunk server for a background loop (GC, repair), made on first use
/// and made again when the server registered another address (it moved, e.g. to a free port):
/// the old address may belong to another chunk server by now.
pub(crate) fn chunk_client<'a>(
    clients: &'a mut HashMap<ServerId, RpcClient>,
    endpoint: &quinn::Endpoint,
    server: &ChunkServerInfo,
    timeout: Duration,
) -> &'a RpcClient {
    let fresh = || RpcClient::new(endpoint.clone(), &server.addr, cairn_net::CHUNK_SERVER_NAME, timeout);
    match clients.entry(server.id) {
        std::collections::hash_map::Entry::Occupied(mut e) => {
            if e.get().addr() != server.addr {
                e.insert(fresh());
            }
            e.into_mut()
        }
        std::collections::hash_map::Entry::Vacant(e) => e.insert(fresh()),
    }
}

impl Handler<MetaRequest, MetaResponse> for MetaService {
    async fn handle(
        &self,
        peer: &Peer,
        req: MetaRequest,
        _payload: Vec<u8>,
    ) -> Result<(MetaResponse, cairn_net::Bytes), WireError> {
        self.metrics.request((&req).into(), self.handle_request(peer, req)).await
    }

    async fn disconnected(&self, peer: &Peer) {
        self.connection_lost(peer.conn_id);
        // The client is gone (unmounted, crashed, or cut off for the idle timeout): its
        // processes' locks go with it, and whoever waits for them may go on.
        self.locks.drop_conn(peer.conn_id);
        self.leases.disconnected(peer.conn_id);
        self.solo.disconnected(peer.conn_id);
    }
}

impl MetaService {
    async fn handle_request(
        &self,
        peer: &Peer,
        req: MetaRequest,
    ) -> Result<(MetaResponse, cairn_net::Bytes), WireError> {
        // Leases on what the request reads are granted before it runs (see `leases`), other
        // clients' buffered writes to what it reads or changes are flushed before it runs,
        // and the other holders of what it changed are recalled before it is answered.
        self.leases.seen(peer);
        // Another client's solo lease ends before anything of this client runs; its holder's
        // deferred changes are checked against it instead.
        if peer.is_client && !matches!(req, MetaRequest::Deferred { .. }) {
            self.solo.recall_for(&self.leases, peer.conn_id).await;
        }
        let read = req.read_inodes();
        self.leases.grant(peer, &read);
        let mut changed = req.changed_inodes();
        // Access times do not conflict with buffered writes; a write lease request recalls
        // the lease itself, to have it passed on. Alone, a client holds every lease there is.
        if self.leases.shared() && !matches!(req, MetaRequest::Touch { .. } | MetaRequest::WriteLease { .. }) {
            let touched: Vec<Ino> = read.iter().chain(&changed).copied().collect();
            self.recall_writers(peer.conn_id, &touched, None).await;
        }
        let names: Vec<(Ino, Vec<u8>)> = req.changed_names().into_iter().map(|(d, n)| (d, n.to_vec())).collect();
        let again =
            matches!(req, MetaRequest::Lookup { .. } | MetaRequest::GetAttr { .. } | MetaRequest::ReadDir { .. })
                .then(|| req.clone());
        let recalls = self.leases.recalls();
        // The answer's inodes not granted already (a lookup's result, a listing's entries).
        let found = |resp: &MetaResponse| -> Vec<Ino> {
            resp.described_inodes().into_iter().filter(|i| !read.contains(i)).collect()
        };
        let mut resp = self.dispatch(peer, req).await?;
        if let MetaResponse::Changed { unnamed, .. } = &resp {
            changed.extend(unnamed);
        }
        let new = found(&resp);
        self.leases.grant(peer, &new);
        // A found file another client is writing: its size and times are in that client's
        // buffers until the recall flushes them, so the request runs again after it.
        self.recall_writers(peer.conn_id, &new, None).await;
        if let Some(req) = again
            && self.leases.recalls() != recalls
        {
            resp = self.dispatch(peer, req).await?;
            self.leases.grant(peer, &found(&resp));
        }
        // Alone, a client has nobody to recall from: skip the lease table on the write path.
        if (!changed.is_empty() || !names.is_empty()) && self.leases.shared() {
            self.leases.recall(peer.conn_id, changed, names).await;
        }
        Ok((resp, cairn_net::Bytes::new()))
    }
}

/// Runs the metadata server until the process is stopped.
pub async fn run(config: MetaConfig) -> Result<(), RunError> {
    let identity = Identity::load(&config.ca, &config.cert, &config.key)?;
    let store = Store::open(&config.db).await?;
    let svc = Arc::new(MetaService::new(store, &config).await?);
    if svc.volume.encrypted {
        // Refuse to start rather than fail every client's hello.
        svc.keys()?;
    }
    let endpoint = cairn_net::server_endpoint(&identity, config.listen)?;
    let gc_endpoint = cairn_net::client_endpoint(&identity)?;
    info!(volume = %svc.volume.name, listen = %endpoint.local_addr()?, "metadata server ready");
    tokio::spawn(svc.clone().repair_loop(gc_endpoint.clone()));
    tokio::spawn(svc.clone().gc_loop(gc_endpoint));
    tokio::spawn(svc.clone().removed_loop());
    let leases = svc.clone();
    tokio::spawn(async move {
        let mut asked = u64::MAX;
        loop {
            tokio::time::sleep(crate::leases::LEASE).await;
            leases.leases.expire();
            asked = leases.forget_locks_record(asked).await;
        }
    });
    if let Some(addr) = config.metrics {
        let scraped = svc.clone();
        cairn_metrics::spawn(addr, svc.metrics.clone(), move || {
            let svc = scraped.clone();
            async move { svc.refresh_metrics().await }
        });
    }
    cairn_net::serve(endpoint, svc).await;
    Ok(())
}

/// Why the metadata server could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Net(#[from] cairn_net::NetError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_chunk_server_that_moved_is_called_at_its_new_address() {
        let ca = cairn_net::pki::generate_ca("test").unwrap();
        let node = cairn_net::pki::issue(&ca, "meta", &[cairn_net::META_SERVER_NAME]).unwrap();
        let id = cairn_net::Identity::from_pem(&ca.cert_pem, &node.cert_pem, &node.key_pem).unwrap();
        let endpoint = cairn_net::client_endpoint(&id).unwrap();
        let mut info = ChunkServerInfo {
            id: 3,
            addr: "127.0.0.1:1001".into(),
            zone: "z".into(),
            capacity: 0,
            free: 0,
            alive: true,
            draining: false,
            slices: 0,
            bytes: 0,
        };
        let mut clients = HashMap::new();
        let timeout = Duration::from_secs(1);
        assert_eq!(chunk_client(&mut clients, &endpoint, &info, timeout).addr(), "127.0.0.1:1001");
        info.addr = "127.0.0.1:1002".into();
        assert_eq!(chunk_client(&mut clients, &endpoint, &info, timeout).addr(), "127.0.0.1:1002");
        assert_eq!(clients.len(), 1);
    }
}
