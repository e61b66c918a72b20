//! File data in metadata terms: slice maps, commits, truncation, holes and garbage collection.

use crate::MetaService;
use crate::error::{MetaError, Result};
use crate::group_commit::{Committed, committed};
use crate::store::{Batch, WriteGuard, reads};
use cairn_proto::meta::{Caller, FallocMode, SetAttrs};
use cairn_proto::*;
use std::time::Duration;

/// How long an inode outlives its last link when nothing has it open.
pub(crate) const REMOVED_GRACE: Duration = Duration::from_secs(5);

/// Inodes freed per transaction by the background purge.
const PURGE_BATCH: usize = 256;

impl MetaService {
    pub(crate) async fn read_map(&self, ino: Ino, chunk: u64) -> Result<(Vec<SliceRef>, u64)> {
        reads::slices(&self.store.readers, ino, chunk).await
    }

    /// `MetaRequest::Compact`.
    pub(crate) async fn compact(&self, ino: Ino, chunk: u64, seq: u64, slice: &SliceRef) -> Result<()> {
        let (pos, end) = (slice.pos as u64, slice.pos as u64 + slice.len as u64);
        if slice.len == 0 || end > self.volume.chunk_size || slice.id == HOLE_SLICE {
            return Err(MetaError::fs(ErrorCode::Invalid, "compacted slice outside its chunk"));
        }
        let mut w = self.store.write().await?;
        // The new row can take the place of the newest row it replaces, below anything
        // committed since; or else go on top, if nothing newer overlaps its range.
        let (newest, at_seq) = reads::overlapping(w.conn(), ino, chunk, seq, pos, end).await?;
        if !at_seq && newest.is_none_or(|n| n > seq) {
            return Err(MetaError::fs(ErrorCode::Busy, "the range changed since it was read"));
        }
        let mut b = Batch::default();
        b.compact_slices(ino, chunk, seq, slice, at_seq);
        w.apply(b).await?;
        Ok(())
    }

    pub(crate) async fn alloc_slices(&self, count: u64) -> Result<SliceId> {
        // Durable: slice ids are the blocks' encryption nonces, so a power cut must never let
        // the counter hand out ids again (see cairn-block).
        let mut b = Batch::durable(true);
        b.alloc_slices(count.clamp(1, 1 << 20));
        Ok(self.store.write().await?.apply(b).await?.value()? as u64)
    }
}

/// What a writer commits (`MetaRequest::Commit`), with the time its slices take as mtime.
pub(crate) struct Commit<'a> {
    pub(crate) slices: &'a [NewSlice],
    pub(crate) min_size: u64,
    pub(crate) durable: bool,
    pub(crate) lease: u64,
    pub(crate) written_at: Timestamp,
    /// Mode, owner and mtime changes to apply after the slices, in the same transaction.
    pub(crate) attrs: Option<&'a SetAttrs>,
}

impl MetaService {
    /// `MetaRequest::Commit`: the file's attributes after it, and chunk 0's map if the file
    /// is small (see `Batch::first_map_of_small`).
    pub(crate) async fn commit(
        &self,
        conn: usize,
        ino: Ino,
        commit: Commit<'_>,
    ) -> Result<(Attr, Option<Vec<SliceRef>>)> {
        let cs = self.volume.chunk_size;
        for s in commit.slices {
            if s.slice.len == 0 || s.slice.pos as u64 + s.slice.len as u64 > cs || s.slice.id == HOLE_SLICE {
                return Err(MetaError::fs(ErrorCode::Invalid, "slice outside its chunk"));
            }
        }
        if commit.min_size > MAX_FILE_SIZE {
            return Err(MetaError::fs(ErrorCode::FileTooBig, "file would exceed the maximum size"));
        }
        if commit.attrs.is_some_and(|a| a.size.is_some() || a.atime.is_some() || a.flags.is_some()) {
            return Err(MetaError::fs(ErrorCode::Invalid, "a commit changes only mode, owner and mtime"));
        }
        let done = match self.commit_grouped(ino, &commit).await? {
            Some(done) => done,
            None => {
                let mut w = self.store.write().await?;
                let a = w.attr(ino).await?;
                let lease = commit.lease;
                if a.flags & inode_flags::IMMUTABLE != 0 {
                    return Err(MetaError::fs(ErrorCode::Perm, "the file is immutable"));
                }
                if a.kind != FileKind::File {
                    return Err(MetaError::fs(ErrorCode::Invalid, "not a regular file"));
                }
                if let Some(set) = commit.attrs {
                    if a.flags & inode_flags::LOCKED != 0 {
                        return Err(MetaError::fs(ErrorCode::Perm, "the file is append-only"));
                    }
                    if a.has_xattrs && reads::lease_epoch(w.conn(), ino).await? == lease {
                        // A chmod rewrites the access ACL too: the slices go first, then
                        // `setattr` does that in its own transaction.
                        let Some(done) = self.commit_in(&mut w, ino, &commit, None).await? else {
                            return Err(MetaError::fs(ErrorCode::Io, "a commit vanished under the writer"));
                        };
                        drop(w);
                        self.leases.reclaim_writer(ino, conn, lease);
                        let attr = self.setattr(ino, set, false).await?;
                        if commit.durable {
                            self.sync().await?;
                        }
                        return Ok((attr, done.1));
                    }
                }
                return Err(MetaError::fs(
                    ErrorCode::LeaseLost,
                    format!(
                        "write lease {lease} on inode {ino} was lost (now {}): another client may have \
                         written since, so these writes are refused",
                        reads::lease_epoch(w.conn(), ino).await?
                    ),
                ));
            }
        };
        // The lease is still this writer's (a restarted server, or a reconnection, forgot who
        // held it): note the holder again, so readers recall it.
        self.leases.reclaim_writer(ino, conn, commit.lease);
        Ok(done)
    }

    /// Applies `commit` with `attrs` in one transaction, or nothing (`None`) unless `ino` is a
    /// regular file under write lease `commit.lease`, not immutable, and, with `attrs`,
    /// neither append-only nor with xattrs.
    pub(crate) async fn commit_in(
        &self,
        w: &mut WriteGuard<'_>,
        ino: Ino,
        commit: &Commit<'_>,
        attrs: Option<&SetAttrs>,
    ) -> Result<Option<Committed>> {
        // One batch validates, updates and inserts: it changes nothing unless it may.
        let mut b = Batch::durable(commit.durable);
        b.commit(ino, commit, attrs);
        committed(&w.apply(b).await?)
    }

    /// `MetaRequest::WriteLease`: grants `conn` the write lease on file `ino`. Another
    /// holder is recalled first and the lease reserved for `conn` meanwhile, so that busy
    /// writers on two clients take turns instead of one starving the other.
    pub(crate) async fn write_lease(&self, conn: usize, ino: Ino) -> Result<(u64, Attr)> {
        loop {
            match self.leases.writer(ino, conn).await {
                Some((c, epoch)) if c == conn && epoch != 0 => {
                    return Ok((epoch, reads::get_attr(&self.store.readers, ino).await?));
                }
                Some((c, _)) if c == conn => break,
                Some(_) => {
                    self.recall_writers(conn, &[ino], Some(conn)).await;
                }
                None if self.leases.reserve(ino, conn) => break,
                None => {}
            }
        }
        let granted = async {
            let mut w = self.store.write().await?;
            let mut b = Batch::default();
            b.new_lease_epoch(ino, self.lease_floor);
            let done = w.apply(b).await?;
            let Some(attr) = done.attr()? else {
                w.attr(ino).await?;
                return Err(MetaError::fs(ErrorCode::Invalid, "write leases are for regular files"));
            };
            Ok((done.value()? as u64, attr))
        };
        match granted.await {
            Ok((epoch, attr)) => {
                self.leases.set_writer(ino, conn, epoch);
                Ok((epoch, attr))
            }
            Err(e) => {
                self.leases.unreserve(ino, conn);
                Err(e)
            }
        }
    }

    /// Has other clients' write leases on `inos` flushed and released, or with `next` passed
    /// to that connection (see [`crate::leases::Leases::recall_writers`]); ends in the database those whose holder did
    /// not answer, so its later commits are refused. True if any lease was recalled.
    pub(crate) async fn recall_writers(&self, from: usize, inos: &[Ino], next: Option<usize>) -> bool {
        let (recalled, lost) = self.leases.recall_writers(from, inos, next).await;
        if !lost.is_empty() {
            // Synced: a revocation lost to a power cut would let its writer, which did not
            // answer, commit again. (Rare: a holder answers its recall.)
            let mut b = Batch::durable(true);
            for (ino, epoch) in &lost {
                b.revoke_lease(*ino, *epoch);
            }
            let done = match self.store.write().await {
                Ok(mut w) => w.apply(b).await.map(|_| ()),
                Err(e) => Err(e),
            };
            match done {
                Ok(()) => tracing::warn!(?lost, "revoked write leases whose holders did not answer a recall"),
                Err(e) => tracing::error!(?lost, "cannot revoke write leases: {e}"),
            }
            self.leases.forget_writers(&lost);
        }
        recalled
    }

    /// Adds to `b` the hole slices that make `[offset, offset + len)` read as zeros.
    fn punch(&self, b: &mut Batch, ino: Ino, offset: u64, len: u64) {
        let cs = self.volume.chunk_size;
        let end = offset.saturating_add(len);
        let mut pos = offset;
        while pos < end {
            let in_chunk = pos % cs;
            let n = (cs - in_chunk).min(end - pos);
            b.insert_hole(ino, pos / cs, in_chunk as u32, n as u32);
            pos += n;
        }
    }

    /// Adds to `b` what drops data past `size` of a file that was `old_size` long: whole chunks
    /// are deleted, the boundary chunk gets a hole up to the old end. Data rows past the old end
    /// are shadowed by the holes of earlier truncations, so the hole need not reach the chunk's
    /// end, and stays small enough for compaction to absorb it.
    pub(crate) fn truncate_data(&self, b: &mut Batch, ino: Ino, old_size: u64, size: u64) {
        let cs = self.volume.chunk_size;
        b.drop_slices(ino, size.div_ceil(cs));
        if !size.is_multiple_of(cs) {
            let end = old_size.min(size.next_multiple_of(cs));
            self.punch(b, ino, size, end - size);
        }
    }

    /// Frees an inode that lost its last link while nothing had it open, after [`REMOVED_GRACE`]:
    /// a client's kernel may have looked the name up just before (or trust a cached entry for
    /// up to its 1 s TTL) and still send an open or getattr for the inode, which then works
    /// instead of failing with a spurious ENOENT (a rename over a file must look atomic).
    pub(crate) fn defer_purge(&self, ino: Ino) {
        let at = tokio::time::Instant::now() + REMOVED_GRACE;
        self.removed.lock().expect("removed lock").push_back((ino, at));
        self.removed_wakeup.notify_one();
    }

    /// Frees the inodes queued by [`MetaService::defer_purge`] once their grace period is over,
    /// unless they were opened meanwhile (then their last close frees them).
    pub(crate) async fn removed_loop(self: std::sync::Arc<Self>) {
        loop {
            let next = self.removed.lock().expect("removed lock").front().map(|(_, at)| *at);
            let Some(at) = next else {
                self.removed_wakeup.notified().await;
                continue;
            };
            tokio::time::sleep_until(at).await;
            let now = tokio::time::Instant::now();
            let due: Vec<Ino> = {
                let mut q = self.removed.lock().expect("removed lock");
                let n = q.iter().take_while(|(_, at)| *at <= now).count();
                q.drain(..n).map(|(ino, _)| ino).collect()
            };
            if let Err(e) = self.purge_removed(&due).await {
                // They are freed at the next start (`purge_orphans`).
                tracing::warn!("freeing removed inodes: {e}");
            }
        }
    }

    /// Frees those of `inos` still unlinked and closed, a few hundred per transaction so that
    /// clients' requests get the writer in between (thousands are due after an `rm -rf`).
    async fn purge_removed(&self, inos: &[Ino]) -> Result<()> {
        let closed: Vec<Ino> = inos.iter().copied().filter(|&i| self.opens.unlinked(i)).collect();
        for group in closed.chunks(PURGE_BATCH) {
            let mut w = self.store.write().await?;
            let mut b = Batch::default();
            for ino in reads::unlinked_among(w.conn(), group).await? {
                // Opened since (by file handle)? Then its last close frees it.
                if self.opens.unlinked(ino) {
                    b.purge_inode(ino);
                }
            }
            self.apply_purge(&mut w, b).await?;
        }
        Ok(())
    }

    /// Frees inodes left unlinked-but-open by a previous run (their handles died with it).
    pub(crate) async fn purge_orphans(&self) -> Result<()> {
        let mut w = self.store.write().await?;
        let mut b = Batch::default();
        for ino in reads::unlinked_inodes(w.conn()).await? {
            b.purge_inode(ino);
        }
        self.apply_purge(&mut w, b).await
    }

    async fn apply_purge(&self, w: &mut WriteGuard<'_>, b: Batch) -> Result<()> {
        if !b.is_empty() {
            w.apply(b).await?;
            self.gc_wakeup.notify_one();
        }
        Ok(())
    }

    /// `MetaRequest::Fallocate`. With `fence`, the file's write lease epoch ends (the
    /// requester does not hold it), as with a truncation (see `MetaService::setattr`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn fallocate(
        &self,
        ino: Ino,
        mode: FallocMode,
        offset: u64,
        len: u64,
        caller: &Caller,
        fence: bool,
    ) -> Result<Attr> {
        if len == 0 {
            return Err(MetaError::fs(ErrorCode::Invalid, "zero length"));
        }
        let end = offset.checked_add(len).filter(|e| *e <= MAX_FILE_SIZE);
        let Some(end) = end else {
            return Err(MetaError::fs(ErrorCode::FileTooBig, "range exceeds the maximum file size"));
        };
        let mut w = self.store.write().await?;
        let mut a = w.attr(ino).await?;
        if a.kind != FileKind::File {
            return Err(MetaError::fs(ErrorCode::NoDevice, "not a regular file"));
        }
        // Allocation (as opposed to punching or zeroing) is all an append-only file allows.
        let allocates = matches!(mode, FallocMode::Allocate | FallocMode::KeepSize);
        if a.flags & inode_flags::IMMUTABLE != 0 || (a.flags & inode_flags::APPEND != 0 && !allocates) {
            return Err(MetaError::fs(ErrorCode::Perm, "the file is immutable or append-only"));
        }
        // Space is not reserved (blocks are written later), but a request that cannot fit in
        // what is free fails now, as on a local filesystem.
        if allocates && len > self.free_bytes() {
            return Err(MetaError::fs(ErrorCode::NoSpace, "not enough free space for the allocation"));
        }
        // As a write would: a caller other than root drops setuid, and setgid where Linux does.
        if caller.uid != 0 {
            let group_exec = a.perm & libc::S_IXGRP != 0;
            a.perm &= !libc::S_ISUID;
            if group_exec || !caller.in_group_or_root(a.gid) {
                a.perm &= !libc::S_ISGID;
            }
        }
        let now = Timestamp::now();
        let mut b = Batch::default();
        if fence {
            b.bump_lease(ino, self.lease_floor);
        }
        if allocates {
            b.add_stored(ino, len);
            a.stored += len;
        }
        match mode {
            FallocMode::Allocate => a.size = a.size.max(end),
            FallocMode::KeepSize => {}
            FallocMode::PunchHole => {
                let end = end.min(a.size);
                if end > offset {
                    self.punch(&mut b, ino, offset, end - offset);
                }
                a.mtime = now;
            }
            FallocMode::ZeroRange { keep_size } => {
                self.punch(&mut b, ino, offset, len);
                if !keep_size {
                    a.size = a.size.max(end);
                }
                a.mtime = now;
            }
        }
        a.ctime = now;
        b.put_attr(&a);
        w.apply(b).await?;
        Ok(a)
    }

    /// Takes a batch of unreferenced slices off the GC queue: `(slice, blocks, servers)`.
    pub(crate) async fn gc_batch(&self, limit: i64) -> Result<Vec<(SliceId, u32, Vec<ServerId>)>> {
        let bs = self.volume.block_size;
        let queue = reads::gc_queue(&self.store.readers, limit).await?;
        Ok(queue.into_iter().map(|(s, len, servers)| (s, len.div_ceil(bs) as u32, servers)).collect())
    }

    pub(crate) async fn gc_done(&self, slices: &[SliceId]) -> Result<()> {
        let mut b = Batch::default();
        b.gc_done(slices);
        self.store.write().await?.apply(b).await?;
        Ok(())
    }

    /// Records read accesses (`MetaRequest::Touch`), in one transaction. A missing inode is
    /// not an error: the file may have been removed since the read.
    pub(crate) async fn touch(&self, times: &[(Ino, Timestamp)]) -> Result<()> {
        let mut b = Batch::default();
        for &(ino, atime) in times {
            b.touch_atime(ino, atime);
        }
        self.store.write().await?.apply(b).await?;
        Ok(())
    }

    /// Commits a durable transaction: everything committed before is now on disk.
    pub(crate) async fn sync(&self) -> Result<()> {
        let mut b = Batch::durable(true);
        b.barrier();
        self.store.write().await?.apply(b).await?;
        Ok(())
    }
}
