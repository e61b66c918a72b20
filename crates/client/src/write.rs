//! Write buffering: writes gather into slice-sized buffers per file, which are stored on chunk
//! servers in the background and committed to the metadata server on flush, fsync, close and
//! recall. A client buffers writes to a file only while it holds the file's write lease
//! (see `cairn-meta`'s `leases`), and every commit carries the lease's epoch.

use crate::{Client, Result};
use cairn_proto::chunk::BlockKey;
use cairn_proto::meta::{Caller, MetaRequest, MetaResponse, SetAttrs};
use cairn_proto::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinHandle};

/// Slices per commit request (well inside the frame header limit).
const COMMIT_BATCH: usize = 4096;

/// Closed files whose buffered writes may be stored and committed in the background at once
/// (see [`Client::behind_write`]); a close beyond them commits in the foreground, which bounds
/// the memory closed files hold.
pub(crate) const WRITE_BEHIND: usize = 64;
/// Attempts, a second apart, to commit a closed file's writes while servers are unreachable;
/// after them the writes stay buffered for the periodic commit and the next reconnection.
const BEHIND_TRIES: u32 = 10;

/// Buffered data is committed at least this often, also while the file stays open:
/// reconciliation deletes stored blocks that no file references for `orphan_grace_secs`
/// (an hour by default), so a long write must not keep stored slices uncommitted that long.
const COMMIT_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// What a store task returns: the slices it stored, in write order, with the blocks the next
/// fsync must sync.
type Stored = Result<Vec<(NewSlice, Vec<(ServerId, BlockKey)>)>>;

/// Sealed buffers up to this size are gathered (see [`WriteState::gathered`]).
const GATHER_MAX: usize = 64 << 10;
/// Gathered buffers are stored once there are this many of them, or [`GATHER_BYTES`].
const GATHER_SLICES: usize = 256;
const GATHER_BYTES: usize = 512 << 10;

/// Per-file write state, shared by every handle of the file on this client.
pub(crate) struct FileState {
    handles: AtomicU32,
    /// Highest end offset written since the last commit (0 when clean).
    size: AtomicU64,
    /// Bytes written since the last commit (overwrites count again): what `st_blocks` adds
    /// until the commit counts them on the metadata server.
    written: AtomicU64,
    /// Time of the last buffered write, in nanoseconds since the epoch.
    written_at: AtomicU64,
    /// Epoch of the write lease held on the file (0: none). Set and cleared under `inner`.
    lease: AtomicU64,
    /// The newest lease epoch recalled: a lease whose grant crossed its own recall is void.
    recalled: AtomicU64,
    /// Held while asking for the lease, so concurrent writers ask once.
    asking: Mutex<()>,
    /// chmod, chown and mtime changes made under the write lease, merged, with the caller of
    /// the last one: sent after the buffered writes at the next flush (see
    /// `Client::buffer_setattr`).
    attrs: std::sync::Mutex<Option<(SetAttrs, Caller)>>,
    inner: Mutex<WriteState>,
}

#[derive(Default)]
struct WriteState {
    /// The buffer being filled: file offset and bytes.
    buf: Option<(u64, Vec<u8>)>,
    /// Small sealed buffers (random writes) waiting to be stored together, in write order,
    /// with their share of the write budget: a store task and a chunk-server request per
    /// 4 KiB write were the cost of random writes. Stored before any later buffer, and at
    /// every flush.
    gathered: Vec<(u64, Vec<u8>, OwnedSemaphorePermit)>,
    /// Sealed buffers being stored, in write order (which is commit order).
    pending: std::collections::VecDeque<JoinHandle<Stored>>,
    /// Slices stored but not committed yet (kept for a retry if the commit fails).
    stored: Vec<NewSlice>,
    /// The first failure to store a sealed buffer, found while reaping `pending`; the next
    /// flush reports it.
    store_failed: Option<crate::ClientError>,
    dirty: bool,
    /// The last failure to store or commit, until an fsync reports it (see
    /// `Client::flush_locked`).
    deferred: Option<crate::ClientError>,
}

impl WriteState {
    /// Nothing written waits to be committed: no buffer being filled or stored, no slice
    /// stored and not committed.
    fn committed(&self) -> bool {
        !self.dirty && self.stored.is_empty()
    }

    /// Committed, and no failure waits to be reported: a close has nothing to do.
    fn quiet(&self) -> bool {
        self.committed()
            && self.buf.is_none()
            && self.gathered.is_empty()
            && self.pending.is_empty()
            && self.store_failed.is_none()
            && self.deferred.is_none()
    }
}

impl FileState {
    pub(crate) fn buffered_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Bytes written since the last commit.
    pub(crate) fn buffered_bytes(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Whether writes or attribute changes wait for the next flush.
    pub(crate) fn has_buffered(&self) -> bool {
        self.size.load(Ordering::Acquire) > 0 || self.pending_attrs().is_some()
    }

    /// Attribute changes waiting for the next flush.
    pub(crate) fn pending_attrs(&self) -> Option<SetAttrs> {
        self.attrs.lock().expect("pending attributes lock").as_ref().map(|(set, _)| set.clone())
    }

    /// When the file was last written, while the write is still buffered: the file's mtime
    /// and ctime until the commit records them on the metadata server.
    pub(crate) fn buffered_mtime(&self) -> Option<Timestamp> {
        self.last_write().filter(|_| self.buffered_size() > 0)
    }

    /// When this client last wrote the file, if it did.
    fn last_write(&self) -> Option<Timestamp> {
        let nanos = self.written_at.load(Ordering::Acquire);
        (nanos > 0).then_some(Timestamp { secs: (nanos / 1_000_000_000) as i64, nanos: (nanos % 1_000_000_000) as u32 })
    }
}

/// Forgets a file's buffered writes (they could not be stored or committed).
fn drop_buffered(f: &FileState, st: &mut WriteState) {
    f.attrs.lock().expect("pending attributes lock").take();
    st.gathered.clear();
    st.stored.clear();
    st.store_failed = None;
    st.dirty = false;
    f.size.store(0, Ordering::Release);
    f.written.store(0, Ordering::Release);
}

/// Why buffered writes are flushed (see [`Client::flush_and`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flush {
    /// A flush, fsync or close, which reports the outcome itself.
    Caller,
    /// Another client's request recalled the write lease.
    Recall,
    /// The periodic commit ([`commit_loop`]).
    Background,
}

/// Bytes that may be buffered or in flight across all files (back-pressure for writers).
pub(crate) struct WriteBudget {
    sem: Arc<Semaphore>,
    max: u32,
}

impl WriteBudget {
    pub(crate) fn new(bytes: u64) -> WriteBudget {
        let max = bytes.clamp(1 << 20, u32::MAX as u64) as u32;
        WriteBudget { sem: Arc::new(Semaphore::new(max as usize)), max }
    }

    async fn acquire(&self, bytes: usize) -> OwnedSemaphorePermit {
        let n = (bytes as u64).clamp(1, self.max as u64) as u32;
        self.sem.clone().acquire_many_owned(n).await.expect("write budget semaphore is never closed")
    }
}

impl Client {
    fn file_state(&self, ino: Ino) -> Arc<FileState> {
        self.files
            .entry(ino)
            .or_insert_with(|| {
                Arc::new(FileState {
                    handles: AtomicU32::new(0),
                    size: AtomicU64::new(0),
                    written: AtomicU64::new(0),
                    written_at: AtomicU64::new(0),
                    lease: AtomicU64::new(0),
                    recalled: AtomicU64::new(0),
                    asking: Mutex::default(),
                    attrs: std::sync::Mutex::default(),
                    inner: Mutex::default(),
                })
            })
            .clone()
    }

    pub(crate) fn opened(&self, ino: Ino) {
        self.file_state(ino).handles.fetch_add(1, Ordering::AcqRel);
    }

    /// Notes the write lease a file created open comes with ([`FIRST_LEASE`]), unless a
    /// recall of it arrived before the answer to the create did.
    pub(crate) fn created(&self, ino: Ino) {
        let f = self.file_state(ino);
        f.handles.fetch_add(1, Ordering::AcqRel);
        if self.early_recalls.remove(&ino).is_none_or(|epoch| epoch < FIRST_LEASE) {
            f.lease.store(FIRST_LEASE, Ordering::Release);
        }
    }

    /// Asks for the file's write lease unless it is held. A lease recalled before its grant
    /// arrived here is void, and is asked for again.
    async fn acquire_lease(&self, f: &FileState, ino: Ino) -> Result<()> {
        // Every write comes here: the usual case, the lease held, takes no lock.
        if f.lease.load(Ordering::Acquire) != 0 {
            return Ok(());
        }
        let _asking = f.asking.lock().await;
        while f.lease.load(Ordering::Acquire) == 0 {
            let (epoch, attr) = match self.call(MetaRequest::WriteLease { ino }).await? {
                MetaResponse::Lease { epoch, attr } => (epoch, attr),
                other => return Err(crate::unexpected(other)),
            };
            self.note_attr(attr);
            let _st = f.inner.lock().await;
            if epoch > f.recalled.load(Ordering::Acquire) {
                f.lease.store(epoch, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Answers a recall of write lease `epoch`: the file's buffered writes are committed and
    /// the lease given up (a newer one, granted after the recall was sent, is kept). If the
    /// commit fails, the buffered writes are dropped with the lease and the error is kept
    /// for the next flush to report.
    pub(crate) async fn give_up_lease(self: &Arc<Self>, ino: Ino, epoch: u64) {
        let Some(f) = self.files.get(&ino).map(|f| f.clone()) else {
            // A file being created: its create's answer, with the lease, is still on its way.
            self.early_recalls.insert(ino, epoch);
            return;
        };
        f.recalled.fetch_max(epoch, Ordering::AcqRel);
        let mut st = f.inner.lock().await;
        if f.lease.load(Ordering::Acquire) > epoch {
            return;
        }
        if let Err(e) = self.flush_locked(ino, &f, &mut st, false, Flush::Recall).await {
            tracing::warn!(ino, "writes flushed for a recall failed: {e}");
        }
        f.lease.store(0, Ordering::Release);
    }

    /// After a lost connection: commits every file written under a lease, so the metadata
    /// server, which forgot the holders, records them again (or refuses the commit if another
    /// client wrote the file meanwhile) before more writes pile up unseen by other clients.
    pub(crate) async fn reclaim_leases(self: &Arc<Self>) {
        let held: Vec<Ino> =
            self.files.iter().filter(|f| f.lease.load(Ordering::Acquire) != 0).map(|f| *f.key()).collect();
        for ino in held {
            let _ = self.flush_in_background(ino).await;
        }
    }

    /// Forgets the write state of a file with no open handle left (it was flushed before).
    pub(crate) fn closed(&self, ino: Ino) {
        self.files.remove_if(&ino, |_, f| {
            let left = f.handles.fetch_sub(1, Ordering::AcqRel).saturating_sub(1);
            left == 0 && f.size.load(Ordering::Acquire) == 0
        });
    }

    /// A close(2): reports what an earlier background store or commit of the file failed
    /// with, as a local filesystem reports a failed writeback. Writes buffered under the
    /// write lease stay buffered: the lease keeps them coherent (another client's access
    /// recalls it, which commits them first), and the last close of the file hands them to
    /// write-behind ([`Client::behind_write`]). Without a lease, they are committed now.
    pub async fn close_flush(self: &Arc<Self>, ino: Ino) -> Result<()> {
        let Some(f) = self.files.get(&ino).map(|f| f.clone()) else {
            return Ok(());
        };
        if f.lease.load(Ordering::Acquire) == 0 {
            return self.flush(ino, false).await;
        }
        let st = f.inner.lock().await;
        st.deferred.clone().map_or(Ok(()), Err)
    }

    /// Whether a close(2) of `ino` by lock owner `owner` has nothing to do: no writes or
    /// attribute changes buffered, stored or failing, and no lock of that owner to drop.
    /// The FUSE thread then answers `FLUSH` itself, without a hand-off to the network thread
    /// and back, which `close(2)` waits for: reading a tree of small files (`tar c`) closes
    /// each one. `false` when unsure (the state is busy), and [`Client::close_flush`] runs.
    pub fn close_is_quiet(&self, ino: Ino, owner: u64) -> bool {
        if self.may_hold_locks(ino, owner) {
            return false;
        }
        let Some(f) = self.files.get(&ino).map(|f| f.clone()) else {
            return true;
        };
        if f.has_buffered() {
            return false;
        }
        f.inner.try_lock().is_ok_and(|st| st.quiet())
    }

    /// Write-behind: if `ino` has writes or attribute changes buffered under its write lease,
    /// a background task stores and commits them and then closes the handle (its
    /// registration, whose last one ends the lease on the server, goes after the commit).
    /// Returns whether it took the handle. `tar x`, `cp -r` and `git checkout` then wait for
    /// neither the chunk servers nor the commit once per file, and a chmod or utimes right
    /// after the close is still merged into the commit. A failure that loses data is kept for
    /// the file's next close or fsync, as a failed writeback; what is buffered is lost if the
    /// client dies before the commit (only fsync promises more).
    pub(crate) fn behind_write(self: &Arc<Self>, ino: Ino) -> bool {
        let Some(f) = self.files.get(&ino).map(|f| f.clone()) else {
            return false;
        };
        if f.lease.load(Ordering::Acquire) == 0 || !f.has_buffered() {
            return false;
        }
        let Ok(turn) = self.write_behind.clone().try_acquire_owned() else {
            return false;
        };
        let client = self.clone();
        tokio::spawn(async move {
            let _turn = turn;
            let mut tries = 0;
            loop {
                let flushed = client.flush_and(ino, false, Flush::Background).await;
                if let Err(e) = &flushed {
                    tracing::warn!(ino, "writes committed after close failed: {e}");
                    // A server away for a moment (restarting): the writes are still buffered
                    // under the lease, so try again before giving the handle up.
                    tries += 1;
                    if tries < BEHIND_TRIES && e.unanswered() {
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                }
                // Under the state lock: a chmod or utimes buffered since (buffer_setattr
                // merges under it) is committed by another round; after the last handle,
                // none is buffered again, the lease being forgotten here with the handle.
                let st = f.inner.lock().await;
                let last = f.handles.load(Ordering::Acquire) == 1;
                if flushed.is_ok() && last && f.pending_attrs().is_some() {
                    continue;
                }
                f.handles.fetch_sub(1, Ordering::AcqRel);
                client.settle_closed(ino, &f, &st);
                break;
            }
            client.send_close(ino);
        });
        true
    }

    /// Once a file has no handle left and nothing of it waits to be committed, forgets its
    /// write lease (the last `Close` ends it on the server) and its write state, which is kept
    /// only while it holds a failure for the next close or fsync to report. Until then the
    /// lease is kept, so that `reclaim_leases` and `commit_loop` can still commit what a lost
    /// connection held back.
    fn settle_closed(&self, ino: Ino, f: &Arc<FileState>, st: &WriteState) {
        if f.handles.load(Ordering::Acquire) != 0 || f.has_buffered() || !st.stored.is_empty() {
            return;
        }
        f.lease.store(0, Ordering::Release);
        if st.deferred.is_none() {
            self.files.remove_if(&ino, |_, g| Arc::ptr_eq(g, f) && g.handles.load(Ordering::Acquire) == 0);
        }
    }

    /// [`Client::flush_and`] in the background (reclaim, periodic commit), then
    /// [`Client::settle_closed`].
    async fn flush_in_background(self: &Arc<Self>, ino: Ino) -> Result<()> {
        let flushed = self.flush_and(ino, false, Flush::Background).await;
        if let Some(f) = self.files.get(&ino).map(|f| f.clone()) {
            let st = f.inner.lock().await;
            self.settle_closed(ino, &f, &st);
        }
        flushed
    }

    /// Commits every file's buffered writes and waits for write-behind to finish: at unmount,
    /// before the client ends.
    pub async fn flush_all(self: &Arc<Self>) {
        let files: Vec<Ino> = self.files.iter().map(|f| *f.key()).collect();
        for ino in files {
            if let Err(e) = self.flush_and(ino, false, Flush::Background).await {
                tracing::warn!(ino, "writes committed at unmount failed: {e}");
            }
        }
        let _all = self.write_behind.acquire_many(WRITE_BEHIND as u32).await;
    }

    pub(crate) fn is_dirty(&self, ino: Ino) -> bool {
        self.files.get(&ino).is_some_and(|f| f.size.load(Ordering::Acquire) > 0)
    }

    /// Buffers `data` at `offset`, or with `append` at the end of the file (which another
    /// client may have moved since the kernel last heard). Returns the offset written and the
    /// bytes taken, once they are buffered (not yet stored).
    pub async fn write(self: &Arc<Self>, ino: Ino, offset: u64, mut data: Vec<u8>, append: bool) -> Result<(u64, u32)> {
        self.check_up()?;
        if self.flags_of(ino) & inode_flags::IMMUTABLE != 0 {
            return Err(crate::ClientError::new(ErrorCode::Perm, "the file is immutable"));
        }
        let f = self.file_state(ino);
        if f.attrs.lock().expect("pending attributes lock").is_some() {
            // Applied after the buffered writes at the flush, so an explicit mtime set before
            // this write must not outlive it.
            self.flush(ino, false).await?;
        }
        let mut st = loop {
            self.acquire_lease(&f, ino).await?;
            let st = f.inner.lock().await;
            if f.lease.load(Ordering::Acquire) != 0 {
                break st;
            }
        };
        let offset = match append {
            true => f.size.load(Ordering::Acquire).max(self.file_size(ino).await?),
            false => offset,
        };
        if offset >= MAX_FILE_SIZE {
            return Err(crate::ClientError::new(ErrorCode::FileTooBig, "write past the maximum file size"));
        }
        // Like Linux at a filesystem's size limit: a write crossing it is cut short.
        data.truncate(data.len().min((MAX_FILE_SIZE - offset) as usize));
        let len = data.len() as u64;
        let end = offset + len;
        let cs = self.volume.chunk_size;
        let bs = self.volume.block_size;
        let appendable = |buf: &Option<(u64, Vec<u8>)>, off: u64| match buf {
            Some((b_off, b)) => off >= *b_off && off <= *b_off + b.len() as u64 && off / cs == *b_off / cs,
            None => false,
        };
        let chunk_end = |off: u64| (off / cs + 1) * cs;
        // A write that fills a whole buffer by itself (what sequential writers send: the
        // kernel's 1 MiB requests) is stored as it is, without a copy.
        if len == bs.min(chunk_end(offset) - offset) && !appendable(&st.buf, offset) {
            self.seal(ino, &mut st, false, None).await;
            st.buf = Some((offset, std::mem::take(&mut data)));
            self.seal(ino, &mut st, false, None).await;
        }
        let (mut off, mut rest) = (offset, &data[..]);
        while !rest.is_empty() {
            let mut n = (rest.len() as u64).min(chunk_end(off) - off);
            if !appendable(&st.buf, off) {
                self.seal(ino, &mut st, false, None).await;
                // Sequential writers fill whole blocks: reserve one so the buffer never regrows.
                let cap = if rest.len() as u64 >= bs / 8 { bs.min(chunk_end(off) - off) as usize } else { rest.len() };
                st.buf = Some((off, Vec::with_capacity(cap)));
            }
            let (b_off, b) = st.buf.as_mut().expect("buffer exists");
            let at = (off - *b_off) as usize;
            n = n.min(bs - at as u64);
            let n_us = n as usize;
            // Overwrite what the buffer holds, append the rest (`at` is at most its length).
            let overlap = (b.len() - at).min(n_us);
            b[at..at + overlap].copy_from_slice(&rest[..overlap]);
            b.extend_from_slice(&rest[overlap..n_us]);
            let full = b.len() as u64 >= bs || *b_off + b.len() as u64 == chunk_end(off);
            if full {
                self.seal(ino, &mut st, false, None).await;
            }
            off += n;
            rest = &rest[n_us..];
        }
        st.dirty = true;
        let now = Timestamp::now();
        f.written_at.store(now.secs as u64 * 1_000_000_000 + now.nanos as u64, Ordering::Release);
        f.size.fetch_max(end, Ordering::AcqRel);
        f.written.fetch_add(len, Ordering::AcqRel);
        if append {
            // The kernel sized the file by what it knew; it must ask again. Not waited for:
            // this write is still in progress in the kernel.
            let client = self.clone();
            tokio::spawn(async move { client.invalidate_kernel_for(vec![ino], Vec::new()).await });
        }
        Ok((offset, len as u32))
    }

    /// Starts storing the current buffer in the background (waits if the budget is spent),
    /// as slice `id` or under an id the store task asks for.
    async fn seal(self: &Arc<Self>, ino: Ino, st: &mut WriteState, sync: bool, id: Option<SliceId>) {
        let Some((off, data)) = st.buf.take() else {
            return;
        };
        if data.is_empty() {
            return;
        }
        let permit = self.write_budget.acquire(data.len()).await;
        self.reap_stored(ino, st);
        if !sync && id.is_none() && data.len() <= GATHER_MAX {
            st.gathered.push((off, data, permit));
            let bytes: usize = st.gathered.iter().map(|(_, d, _)| d.len()).sum();
            if st.gathered.len() >= GATHER_SLICES || bytes >= GATHER_BYTES {
                self.store_gathered(st);
            }
            return;
        }
        self.store_gathered(st);
        let client = self.clone();
        let cs = self.volume.chunk_size;
        st.pending.push_back(tokio::spawn(async move {
            let id = match id {
                Some(id) => id,
                None => client.next_slice_id().await?,
            };
            let len = data.len();
            let servers = client.store_slice(id, data, sync).await?;
            drop(permit);
            let blocks = len.div_ceil(client.volume.block_size as usize) as u32;
            // Blocks stored without sync must be synced by the next fsync.
            let keys = match sync {
                true => Vec::new(),
                false => servers
                    .iter()
                    .flat_map(|s| (0..blocks).map(move |index| (*s, BlockKey { slice: id, index })))
                    .collect(),
            };
            let slice = SliceRef { pos: (off % cs) as u32, len: len as u32, id, servers };
            Ok(vec![(NewSlice { chunk: off / cs, slice }, keys)])
        }));
    }

    /// Starts storing the gathered small buffers, as one slice each, in one task.
    fn store_gathered(self: &Arc<Self>, st: &mut WriteState) {
        if st.gathered.is_empty() {
            return;
        }
        let gathered = std::mem::take(&mut st.gathered);
        let client = self.clone();
        let cs = self.volume.chunk_size;
        st.pending.push_back(tokio::spawn(async move {
            let (mut slices, mut placed, mut permits) = (Vec::new(), Vec::new(), Vec::new());
            for (off, data, permit) in gathered {
                let id = client.next_slice_id().await?;
                placed.push((off, id, data.len()));
                slices.push((id, data));
                permits.push(permit);
            }
            let servers = client.store_small_slices(slices).await?;
            drop(permits);
            let stored = placed.into_iter().zip(servers).map(|((off, id, len), servers)| {
                let keys = servers.iter().map(|s| (*s, BlockKey { slice: id, index: 0 })).collect();
                let slice = SliceRef { pos: (off % cs) as u32, len: len as u32, id, servers };
                (NewSlice { chunk: off / cs, slice }, keys)
            });
            Ok(stored.collect())
        }));
    }

    /// Takes the results of the store tasks that finished, oldest first, so that many small
    /// writes do not keep a finished task (the size of its whole future) per slice until the
    /// next commit.
    fn reap_stored(&self, ino: Ino, st: &mut WriteState) {
        while let Some(handle) = st.pending.front_mut().filter(|h| h.is_finished()) {
            // `unconstrained`: tokio's cooperative budget could otherwise answer "pending".
            let Some(outcome) = futures::FutureExt::now_or_never(tokio::task::unconstrained(handle)) else {
                return;
            };
            st.pending.pop_front();
            self.note_stored(ino, st, outcome);
        }
    }

    /// Records one store task's outcome: the slice joins those to commit, or the first
    /// failure is kept for the flush to report.
    fn note_stored(&self, ino: Ino, st: &mut WriteState, outcome: std::result::Result<Stored, JoinError>) {
        match outcome {
            Ok(Ok(slices)) => {
                for (slice, keys) in slices {
                    st.stored.push(slice);
                    if !keys.is_empty() {
                        self.unsynced.entry(ino).or_default().extend(keys);
                    }
                }
            }
            Ok(Err(e)) => {
                st.store_failed.get_or_insert(e);
            }
            Err(e) => {
                st.store_failed.get_or_insert(crate::ClientError::new(ErrorCode::Io, e.to_string()));
            }
        }
    }

    /// Stores and commits everything written so far; with `durable`, also makes it survive
    /// a crash of every server (fsync).
    pub async fn flush(self: &Arc<Self>, ino: Ino, durable: bool) -> Result<()> {
        self.flush_and(ino, durable, Flush::Caller).await
    }

    /// [`Client::flush`] for `why` (see [`Flush`]).
    async fn flush_and(self: &Arc<Self>, ino: Ino, durable: bool, why: Flush) -> Result<()> {
        let Some(f) = self.files.get(&ino).map(|f| f.clone()) else {
            return if durable { self.sync_file(ino).await } else { Ok(()) };
        };
        let mut st = f.inner.lock().await;
        self.flush_locked(ino, &f, &mut st, durable, why).await
    }

    /// Stores and commits the buffered writes of a file whose state is locked. A failure is
    /// kept: every caller's `close` reports it (any process's, also one that only inherited
    /// the descriptor across a fork), and the next `fsync` reports it and clears it, as a
    /// local filesystem reports a failed writeback.
    async fn flush_locked(
        self: &Arc<Self>,
        ino: Ino,
        f: &FileState,
        st: &mut WriteState,
        durable: bool,
        why: Flush,
    ) -> Result<()> {
        let result = self.store_and_commit(ino, f, st, durable, why).await;
        // Kept for later closes and fsyncs when data was lost with it; what is still buffered
        // or stored uncommitted goes with a later flush, and nothing is lost.
        if let Err(e) = &result
            && st.committed()
        {
            st.deferred = Some(e.clone());
        }
        if why != Flush::Caller {
            return result;
        }
        let kept = if durable { st.deferred.take() } else { st.deferred.clone() };
        result.and(kept.map_or(Ok(()), Err))
    }

    async fn store_and_commit(
        self: &Arc<Self>,
        ino: Ino,
        f: &FileState,
        st: &mut WriteState,
        durable: bool,
        why: Flush,
    ) -> Result<()> {
        if st.committed() {
            self.send_attrs(ino, f).await?;
            return if durable { self.sync_file(ino).await } else { Ok(()) };
        }
        // The slice id and a live chunk server first: while the metadata server or every
        // chunk server is away (restarting), the buffer stays for a later flush instead of
        // being lost with a store task that cannot succeed.
        let buffered = st.buf.as_ref().is_some_and(|(_, b)| !b.is_empty());
        if buffered || !st.gathered.is_empty() {
            let id = if buffered { Some(self.next_slice_id().await?) } else { None };
            let live = |list: &[ChunkServerInfo]| list.iter().any(|s| s.alive);
            if !live(&self.servers(false).await?) && !live(&self.servers(true).await?) {
                return Err(crate::ClientError::new(ErrorCode::Io, "no chunk server is live"));
            }
            if id.is_some() {
                self.seal(ino, st, durable, id).await;
            }
            self.store_gathered(st);
        }
        for handle in std::mem::take(&mut st.pending) {
            self.note_stored(ino, st, handle.await);
        }
        if let Some(e) = st.store_failed.take() {
            // The data could not be stored: report it once, as a local filesystem reports a
            // failed writeback, and drop the buffered state so later calls do not repeat it.
            drop_buffered(f, st);
            return Err(e);
        }
        if durable {
            self.sync_blocks_of(ino).await?;
        }
        let min_size = f.size.load(Ordering::Acquire);
        // Attribute changes buffered after the writes go with the last commit, in its
        // transaction (one request per file fewer for `tar x`). If the server refuses them,
        // the slices are committed alone and the refusal reported, as a `SetAttr` after the
        // commit would have been.
        let mut attrs = f.pending_attrs();
        let mut refused = None;
        // Many small random writes make many slices: commit them in batches that fit a frame,
        // in order, dropping each batch from `stored` once it is committed.
        let mut attr = None;
        while attr.is_none() || !st.stored.is_empty() {
            let n = st.stored.len().min(COMMIT_BATCH);
            let last = n == st.stored.len();
            let slices = st.stored[..n].to_vec();
            let req = MetaRequest::Commit {
                ino,
                slices,
                min_size: if last { min_size } else { 0 },
                durable: durable && last,
                lease: f.lease.load(Ordering::Acquire),
                written_at: f.last_write(),
                attrs: if last { attrs.clone() } else { None },
            };
            match self.call_attr(req).await {
                Ok(a) => attr = Some(a),
                Err(e) if last && attrs.is_some() && e.code != ErrorCode::LeaseLost && !e.unanswered() => {
                    f.attrs.lock().expect("pending attributes lock").take();
                    attrs = None;
                    refused = Some(e);
                    continue;
                }
                // Another client may have written since: these writes are refused for good. A
                // recall gives the lease up, so what it could not commit cannot stay either.
                Err(e) if e.code == ErrorCode::LeaseLost || why == Flush::Recall => {
                    tracing::warn!(ino, "buffered writes dropped: {e}");
                    f.lease.store(0, Ordering::Release);
                    drop_buffered(f, st);
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
            st.stored.drain(..n);
        }
        let attr = attr.expect("committed at least once");
        if attrs.is_some() {
            // Sent with the commit; none can have been added meanwhile (buffering takes the
            // state lock, held here).
            f.attrs.lock().expect("pending attributes lock").take();
        }
        st.dirty = false;
        f.size.store(0, Ordering::Release);
        f.written.store(0, Ordering::Release);
        self.sizes.insert(ino, attr.size);
        self.invalidate_data(ino);
        // The kernel cached these writes as it passed them here (whole pages; a partly written
        // page it reads again): its pages are the file as this commit left it, so the next
        // open keeps them (a linker reading what a compiler wrote, a copy read back to check).
        self.page_states.insert(ino, crate::PageState::of(&attr));
        refused.map_or(Ok(()), Err)
    }

    /// Keeps a chmod, chown or mtime change of a file this client holds the write lease on
    /// with its buffered writes, to be sent after them at the next flush (close, fsync,
    /// recall, the periodic commit): `tar x` makes all three on every file it writes, a
    /// round trip each otherwise. Another client's access recalls the lease and so sees
    /// them. Returns the attributes as they now read, or `None` if the change must go to the
    /// server now: a size, atime or flags change, a file with xattrs (chmod rewrites its ACL)
    /// or flags, or no lease.
    pub(crate) async fn buffer_setattr(&self, ino: Ino, set: &SetAttrs, caller: &Caller) -> Result<Option<Attr>> {
        let simple = set.size.is_none() && set.atime.is_none() && set.flags.is_none();
        let Some(f) = self.files.get(&ino).map(|f| f.clone()).filter(|_| simple) else {
            return Ok(None);
        };
        let (attr, _) = self.stat(ino).await?;
        if attr.kind != FileKind::File || attr.flags != 0 || attr.has_xattrs {
            return Ok(None);
        }
        // Under the state lock, so a recall cannot take the lease between the check and the
        // merge; its flush sends what is merged.
        let _st = f.inner.lock().await;
        if f.lease.load(Ordering::Acquire) == 0 {
            return Ok(None);
        }
        let now = Timestamp::now();
        {
            let mut pending = f.attrs.lock().expect("pending attributes lock");
            let (merged, by) = pending.get_or_insert_with(|| (SetAttrs::default(), caller.clone()));
            merged.perm = set.perm.or(merged.perm);
            merged.uid = set.uid.or(merged.uid);
            merged.gid = set.gid.or(merged.gid);
            merged.mtime = set.mtime.map(|t| TimeSet::At(t.resolve(now))).or(merged.mtime);
            merged.ctime = Some(set.ctime.unwrap_or(now));
            *by = caller.clone();
        }
        Ok(Some(self.note_attr(attr)))
    }

    /// Sends the attribute changes kept by [`Client::buffer_setattr`]; true if there were any.
    async fn send_attrs(&self, ino: Ino, f: &FileState) -> Result<bool> {
        let Some((set, caller)) = f.attrs.lock().expect("pending attributes lock").take() else {
            return Ok(false);
        };
        self.call_attr(MetaRequest::SetAttr { ino, set, caller }).await?;
        Ok(true)
    }

    /// fsync of a file with nothing buffered: blocks stored earlier without sync (possibly
    /// through a handle closed since) and the metadata committed so far become durable.
    async fn sync_file(&self, ino: Ino) -> Result<()> {
        self.sync_blocks_of(ino).await?;
        self.sync_metadata().await
    }

    async fn sync_blocks_of(&self, ino: Ino) -> Result<()> {
        let Some((_, mut keys)) = self.unsynced.remove(&ino) else { return Ok(()) };
        let mut result = self.sync_blocks(keys.clone()).await;
        if result.as_ref().is_err_and(|e| e.code == ErrorCode::NotFound) {
            // Blocks of slices since replaced (truncation, compaction) may be deleted already;
            // their bytes are no longer part of the file. Copies may also have moved (repair,
            // rebalance, drain): the others are synced where the file's maps now put them.
            match self.referenced_slices(ino).await {
                Ok(live) => {
                    let mut now: Vec<(ServerId, BlockKey)> = keys
                        .iter()
                        .filter_map(|(_, k)| live.get(&k.slice).map(|holders| (holders, *k)))
                        .flat_map(|(holders, k)| holders.iter().map(move |h| (*h, k)))
                        .collect();
                    now.sort();
                    now.dedup();
                    keys = now;
                    result = self.sync_blocks(keys.clone()).await;
                }
                Err(e) => result = Err(e),
            }
        }
        if let Err(e) = result {
            self.unsynced.entry(ino).or_default().extend(keys);
            return Err(e);
        }
        Ok(())
    }

    /// Every slice the file's maps reference now, with the servers holding it (none if the
    /// file is gone).
    async fn referenced_slices(&self, ino: Ino) -> Result<std::collections::HashMap<SliceId, Vec<ServerId>>> {
        let size = match self.server_attr(ino).await {
            Ok(a) => a.size,
            Err(e) if e.code == ErrorCode::NotFound => return Ok(Default::default()),
            Err(e) => return Err(e),
        };
        let mut live = std::collections::HashMap::new();
        for chunk in 0..=size / self.volume.chunk_size {
            live.extend(self.read_map(ino, chunk).await?.0.into_iter().map(|s| (s.id, s.servers)));
        }
        Ok(live)
    }
}

/// Commits every file's buffered data every [`COMMIT_EVERY`] until the client is dropped. A
/// failure is kept for the file's next flush (close, fsync) to report, as a failed writeback.
pub(crate) async fn commit_loop(client: std::sync::Weak<Client>) {
    loop {
        tokio::time::sleep(COMMIT_EVERY).await;
        let Some(c) = client.upgrade() else { return };
        let dirty: Vec<Ino> = c.files.iter().filter(|f| f.has_buffered()).map(|f| *f.key()).collect();
        for ino in dirty {
            if let Err(e) = c.flush_in_background(ino).await {
                tracing::warn!(ino, "background commit failed: {e}");
            }
        }
    }
}

/// Shows attribute changes not sent yet (see [`Client::buffer_setattr`]) in `a`.
pub(crate) fn overlay_attrs(a: &mut Attr, set: &SetAttrs) {
    if let Some(perm) = set.perm {
        a.perm = perm & 0o7777;
    }
    a.uid = set.uid.unwrap_or(a.uid);
    a.gid = set.gid.unwrap_or(a.gid);
    if let Some(TimeSet::At(t)) = set.mtime {
        a.mtime = t;
    }
    a.ctime = set.ctime.unwrap_or(a.ctime);
}
