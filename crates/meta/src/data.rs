//! File data in metadata terms: slice maps, commits, truncation, holes and garbage collection.

use crate::MetaService;
use crate::error::{MetaError, Result};
use crate::store::{INODE_COLUMNS, Tx, attr_from_row, get_attr, put_attr, servers_from_text, servers_to_text};
use cairn_proto::meta::FallocMode;
use cairn_proto::*;
use std::time::Duration;

/// How long an inode outlives its last link when nothing has it open.
pub(crate) const REMOVED_GRACE: Duration = Duration::from_secs(5);

impl MetaService {
    pub(crate) async fn read_map(&self, ino: Ino, chunk: u64) -> Result<Vec<SliceRef>> {
        let rows: Vec<(i64, i64, i64, String)> =
            sqlx::query_as("SELECT pos, len, slice, servers FROM slices WHERE ino = ? AND chunk = ? ORDER BY seq")
                .bind(ino as i64)
                .bind(chunk as i64)
                .fetch_all(&self.store.readers)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(pos, len, id, servers)| SliceRef {
                pos: pos as u32,
                len: len as u32,
                id: id as u64,
                servers: servers_from_text(&servers),
            })
            .collect())
    }

    pub(crate) async fn alloc_slices(&self, count: u64) -> Result<SliceId> {
        let count = count.clamp(1, 1 << 20);
        let mut w = self.store.write().await?;
        let mut tx = w.begin().await?;
        let (first,): (i64,) =
            sqlx::query_as("UPDATE counters SET value = value + ? WHERE name = 'next_slice' RETURNING value - ?")
                .bind(count as i64)
                .bind(count as i64)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(first as u64)
    }

    async fn insert_slice(tx: &mut Tx<'_>, ino: Ino, chunk: u64, s: &SliceRef) -> Result<()> {
        sqlx::query("INSERT INTO slices (ino, chunk, pos, len, slice, servers) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(ino as i64)
            .bind(chunk as i64)
            .bind(s.pos as i64)
            .bind(s.len as i64)
            .bind(s.id as i64)
            .bind(servers_to_text(&s.servers))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    pub(crate) async fn commit(&self, ino: Ino, slices: &[NewSlice], min_size: u64, durable: bool) -> Result<Attr> {
        let cs = self.volume.chunk_size;
        for s in slices {
            if s.slice.len == 0 || s.slice.pos as u64 + s.slice.len as u64 > cs || s.slice.id == HOLE_SLICE {
                return Err(MetaError::fs(ErrorCode::Invalid, "slice outside its chunk"));
            }
        }
        if min_size > MAX_FILE_SIZE {
            return Err(MetaError::fs(ErrorCode::FileTooBig, "file would exceed the maximum size"));
        }
        let mut w = self.store.write().await?;
        if durable {
            w.set_durable(true).await?;
        }
        let result = async {
            let mut tx = w.begin().await?;
            // Validate and update in one statement, insert all slices in one more: each
            // statement is a round trip to SQLite's worker thread.
            let now = Timestamp::now();
            let touched = !slices.is_empty();
            let row = sqlx::query(&format!(
                "UPDATE inodes SET size = MAX(size, ?), \
                 mtime_s = CASE WHEN ? THEN ? ELSE mtime_s END, mtime_ns = CASE WHEN ? THEN ? ELSE mtime_ns END, \
                 ctime_s = CASE WHEN ? THEN ? ELSE ctime_s END, ctime_ns = CASE WHEN ? THEN ? ELSE ctime_ns END \
                 WHERE ino = ? AND kind = ? RETURNING {INODE_COLUMNS}"
            ))
            .bind(min_size as i64)
            .bind(touched)
            .bind(now.secs)
            .bind(touched)
            .bind(now.nanos as i64)
            .bind(touched)
            .bind(now.secs)
            .bind(touched)
            .bind(now.nanos as i64)
            .bind(ino as i64)
            .bind(FileKind::File.to_i64())
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                get_attr(&mut *tx, ino).await?;
                return Err(MetaError::fs(ErrorCode::Invalid, "not a regular file"));
            };
            for part in slices.chunks(1000) {
                let mut q = sqlx::QueryBuilder::new("INSERT INTO slices (ino, chunk, pos, len, slice, servers) ");
                q.push_values(part, |mut b, s| {
                    b.push_bind(ino as i64)
                        .push_bind(s.chunk as i64)
                        .push_bind(s.slice.pos as i64)
                        .push_bind(s.slice.len as i64)
                        .push_bind(s.slice.id as i64)
                        .push_bind(servers_to_text(&s.slice.servers));
                });
                q.build().execute(&mut *tx).await?;
            }
            let a = attr_from_row(&row)?;
            tx.commit().await?;
            Ok(a)
        }
        .await;
        if durable {
            w.set_durable(false).await?;
        }
        result
    }

    /// Makes `[offset, offset + len)` read as zeros by committing hole slices over it.
    async fn punch(&self, tx: &mut Tx<'_>, ino: Ino, offset: u64, len: u64) -> Result<()> {
        let cs = self.volume.chunk_size;
        let end = offset.saturating_add(len);
        let mut pos = offset;
        while pos < end {
            let chunk = pos / cs;
            let in_chunk = pos % cs;
            let n = (cs - in_chunk).min(end - pos);
            let hole = SliceRef { pos: in_chunk as u32, len: n as u32, id: HOLE_SLICE, servers: vec![] };
            Self::insert_slice(tx, ino, chunk, &hole).await?;
            pos += n;
        }
        Ok(())
    }

    /// Drops data past `size`: whole chunks are deleted, the boundary chunk gets a hole.
    pub(crate) async fn truncate_data(&self, tx: &mut Tx<'_>, ino: Ino, size: u64) -> Result<()> {
        let cs = self.volume.chunk_size;
        let first_dropped = size.div_ceil(cs);
        self.drop_slices(tx, ino, first_dropped).await?;
        if !size.is_multiple_of(cs) {
            let tail = cs - size % cs;
            self.punch(tx, ino, size, tail).await?;
        }
        Ok(())
    }

    /// Deletes slice rows of chunks `>= from_chunk` and queues unreferenced slices for GC.
    async fn drop_slices(&self, tx: &mut Tx<'_>, ino: Ino, from_chunk: u64) -> Result<()> {
        // A slice belongs to one chunk of one file, so deleting every row of these chunks
        // leaves their slices unreferenced: queue them all for block deletion.
        sqlx::query(
            "INSERT OR IGNORE INTO gc_slices (slice, len, servers) \
             SELECT slice, len, servers FROM slices WHERE ino = ? AND chunk >= ? AND slice != 0",
        )
        .bind(ino as i64)
        .bind(from_chunk as i64)
        .execute(&mut **tx)
        .await?;
        sqlx::query("DELETE FROM slices WHERE ino = ? AND chunk >= ?")
            .bind(ino as i64)
            .bind(from_chunk as i64)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Removes an inode nothing refers to any more, with its xattrs and data.
    pub(crate) async fn purge_inode(&self, tx: &mut Tx<'_>, ino: Ino) -> Result<()> {
        self.drop_slices(tx, ino, 0).await?;
        sqlx::query("DELETE FROM xattrs WHERE ino = ?").bind(ino as i64).execute(&mut **tx).await?;
        sqlx::query("DELETE FROM inodes WHERE ino = ?").bind(ino as i64).execute(&mut **tx).await?;
        self.gc_wakeup.notify_one();
        Ok(())
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

    async fn purge_removed(&self, inos: &[Ino]) -> Result<()> {
        let mut w = self.store.write().await?;
        let mut tx = w.begin().await?;
        for &ino in inos {
            if let Ok(a) = get_attr(&mut *tx, ino).await
                && a.nlink == 0
                && !self.opens.is_open(ino)
            {
                self.purge_inode(&mut tx, ino).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Frees inodes left unlinked-but-open by a previous run (their handles died with it).
    pub(crate) async fn purge_orphans(&self) -> Result<()> {
        let mut w = self.store.write().await?;
        let mut tx = w.begin().await?;
        let orphans: Vec<(i64,)> = sqlx::query_as("SELECT ino FROM inodes WHERE nlink = 0").fetch_all(&mut *tx).await?;
        for (ino,) in orphans {
            self.purge_inode(&mut tx, ino as u64).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn fallocate(&self, ino: Ino, mode: FallocMode, offset: u64, len: u64) -> Result<Attr> {
        if len == 0 {
            return Err(MetaError::fs(ErrorCode::Invalid, "zero length"));
        }
        let end = offset.checked_add(len).filter(|e| *e <= MAX_FILE_SIZE);
        let Some(end) = end else {
            return Err(MetaError::fs(ErrorCode::FileTooBig, "range exceeds the maximum file size"));
        };
        let mut w = self.store.write().await?;
        let mut tx = w.begin().await?;
        let mut a = get_attr(&mut *tx, ino).await?;
        if a.kind != FileKind::File {
            return Err(MetaError::fs(ErrorCode::NoDevice, "not a regular file"));
        }
        let now = Timestamp::now();
        match mode {
            FallocMode::Allocate => a.size = a.size.max(end),
            FallocMode::KeepSize => {}
            FallocMode::PunchHole => {
                let end = end.min(a.size);
                if end > offset {
                    self.punch(&mut tx, ino, offset, end - offset).await?;
                }
                a.mtime = now;
            }
            FallocMode::ZeroRange { keep_size } => {
                self.punch(&mut tx, ino, offset, len).await?;
                if !keep_size {
                    a.size = a.size.max(end);
                }
                a.mtime = now;
            }
        }
        a.ctime = now;
        put_attr(&mut tx, &a).await?;
        tx.commit().await?;
        Ok(a)
    }

    /// Takes a batch of unreferenced slices off the GC queue: `(slice, blocks, servers)`.
    pub(crate) async fn gc_batch(&self, limit: i64) -> Result<Vec<(SliceId, u32, Vec<ServerId>)>> {
        let rows: Vec<(i64, i64, String)> = sqlx::query_as("SELECT slice, len, servers FROM gc_slices LIMIT ?")
            .bind(limit)
            .fetch_all(&self.store.readers)
            .await?;
        let bs = self.volume.block_size;
        Ok(rows
            .into_iter()
            .map(|(s, len, servers)| (s as u64, (len as u64).div_ceil(bs) as u32, servers_from_text(&servers)))
            .collect())
    }

    pub(crate) async fn gc_done(&self, slices: &[SliceId]) -> Result<()> {
        let mut w = self.store.write().await?;
        let mut tx = w.begin().await?;
        for s in slices {
            sqlx::query("DELETE FROM gc_slices WHERE slice = ?").bind(*s as i64).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Commits an empty durable transaction: everything committed before is now on disk.
    pub(crate) async fn sync(&self) -> Result<()> {
        let mut w = self.store.write().await?;
        w.set_durable(true).await?;
        let r = async {
            let mut tx = w.begin().await?;
            sqlx::query("UPDATE counters SET value = value WHERE name = 'next_slice'").execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(())
        }
        .await;
        w.set_durable(false).await?;
        r
    }
}
