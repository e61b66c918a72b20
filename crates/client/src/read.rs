//! Reads: chunk maps from the metadata server, blocks from chunk servers (cached), readahead.

use crate::layout::resolve;
use crate::{Client, ClientError, Result};
use cairn_proto::chunk::BlockKey;
use cairn_proto::meta::{MetaRequest, MetaResponse};
use cairn_proto::*;
use std::sync::Arc;

/// How far past a sequential read blocks are fetched in advance, in blocks.
const READAHEAD_BLOCKS: u64 = 4;

/// Reads at least this large are taken for the kernel's readahead of a stream (see
/// [`Client::read`]).
const STREAM_READ: u64 = 64 << 10;

/// A kernel read of a file in progress, from its request until its reply (see
/// [`Client::reading`]).
pub struct Reading {
    client: Arc<Client>,
    ino: Ino,
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.client.reads_in_flight.remove_if_mut(&self.ino, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

/// What an answer read at `epoch` told of a file (a directory page's entry, an open's,
/// a commit's, an empty file's creation): its attributes and chunk 0's map (`None` for an
/// empty file), read together on the server, which is exactly what an `Open` would have
/// answered then. Any open starts fetching the data by the map; under the solo lease, an open
/// of a file nothing changed since is answered from it (see `deferred`).
#[derive(Clone)]
pub(crate) struct OpenHint {
    pub(crate) attr: Attr,
    pub(crate) map: Option<Arc<Vec<SliceRef>>>,
    pub(crate) epoch: u64,
    /// From a listing: the directory, the inodes of the page in listing order, and the file's
    /// place in it; opens that follow that order read ahead (`read_ahead_files`).
    order: Option<(Ino, Arc<Vec<Ino>>, usize)>,
}

/// Files fetched in advance of a run of opens in listing order.
const FILES_AHEAD: usize = 8;

impl Client {
    /// Marks a kernel read of `ino` in progress until the returned guard drops, which the
    /// mount does after replying. The kernel keeps the pages being read locked until then, so
    /// dropping the file's pages waits for the reply: a recall that this very read caused
    /// (it made another client commit) must not wait for that (see `recall`).
    pub fn reading(self: &Arc<Self>, ino: Ino) -> Reading {
        *self.reads_in_flight.entry(ino).or_insert(0) += 1;
        Reading { client: self.clone(), ino }
    }

    async fn chunk_map(self: &Arc<Self>, ino: Ino, chunk: u64) -> Result<Arc<Vec<SliceRef>>> {
        self.check_session();
        let key = (ino, self.data_generation(ino), chunk);
        self.maps
            .try_get_with(key, async move {
                let (map, _) = self.read_map(ino, chunk).await?;
                self.maybe_compact(ino, chunk, map.len());
                Ok(Arc::new(map))
            })
            .await
            .map_err(|e: Arc<ClientError>| (*e).clone())
    }

    pub(crate) async fn file_size(&self, ino: Ino) -> Result<u64> {
        self.check_session();
        match self.sizes.get(&ino) {
            Some(s) => Ok(s),
            None => Ok(self.getattr(ino).await?.size),
        }
    }

    /// Reads up to `size` bytes at `offset`; short only at end of file.
    pub async fn read(self: &Arc<Self>, ino: Ino, offset: u64, size: u32) -> Result<Vec<u8>> {
        self.check_up()?;
        if self.is_dirty(ino) {
            self.flush(ino, false).await?;
        }
        let file_size = self.file_size(ino).await?;
        self.accessed(ino, false);
        if offset >= file_size || size == 0 {
            return Ok(Vec::new());
        }
        let end = file_size.min(offset + size as u64);
        // Readahead when this read starts near where the previous one ended: the kernel's own
        // readahead sends several reads at once, so exact adjacency is too strict a test. A
        // small read must start exactly there: one that does not is a random read (a database
        // page), or the kernel filling a few pages its cache lost (the machine's memory manager
        // drops scattered pages) in a file it otherwise holds. Reading ahead would fetch
        // blocks whose pages it has, and such a read fetches only the frames it needs.
        let stream = size as u64 >= STREAM_READ;
        let near = |prev: u64| match stream {
            true => offset.abs_diff(prev) <= 2 * self.volume.block_size,
            false => offset == prev,
        };
        let sequential = self.last_read.get(&ino).is_some_and(near);
        let mut out = vec![0u8; (end - offset) as usize];
        self.read_into(ino, offset, &mut out, !(stream || sequential)).await?;
        self.last_read.insert(ino, end);
        if sequential && end < file_size {
            let client = self.clone();
            let ahead = (READAHEAD_BLOCKS * self.volume.block_size).min(file_size - end);
            tokio::spawn(async move { client.prefetch(ino, end, ahead).await });
        }
        Ok(out)
    }

    /// Fills `out` with the file's bytes starting at `offset` (zeros where nothing is stored);
    /// a `small` read fetches frames, not blocks (see [`Client::fill`]).
    async fn read_into(self: &Arc<Self>, ino: Ino, offset: u64, out: &mut [u8], small: bool) -> Result<()> {
        let jobs = self.plan(ino, offset, out.len() as u64).await?;
        match self.fill(&jobs, out, small).await {
            // A cached map can name blocks whose slices were since replaced (compaction,
            // truncation) and garbage-collected: read again with a fresh map.
            Err(e) if e.code == ErrorCode::NotFound => {
                self.invalidate_data(ino);
                out.fill(0);
                let jobs = self.plan(ino, offset, out.len() as u64).await?;
                self.fill(&jobs, out, small).await
            }
            other => other,
        }
    }

    /// Copies the planned block ranges into `out`. With `small` (a random read), a range of a
    /// block not cached whole is fetched as the frames that hold it (see [`Client::frame`]).
    pub(crate) async fn fill(&self, jobs: &[Copy], out: &mut [u8], small: bool) -> Result<()> {
        let fetched = futures::future::join_all(jobs.iter().map(|j| self.pieces(j, small))).await;
        for (job, pieces) in jobs.iter().zip(fetched) {
            let mut at = job.out_off;
            for (piece, from, len) in pieces? {
                let src = piece.data().get(from..from + len).ok_or_else(|| {
                    ClientError::new(ErrorCode::Io, format!("block {:?} is shorter than its slice", job.key))
                })?;
                out[at..at + len].copy_from_slice(src);
                at += len;
            }
        }
        Ok(())
    }

    /// The cached blocks or frames that hold a job's bytes, each with the offset and length of
    /// the job's part in it.
    async fn pieces(&self, job: &Copy, small: bool) -> Result<Vec<(Arc<crate::blocks::Block>, usize, usize)>> {
        const FRAME: usize = cairn_block::FRAME;
        if !small || job.block_len <= FRAME {
            return Ok(vec![(self.block(job.key, &job.servers).await?, job.block_off, job.len)]);
        }
        let (start, end) = (job.block_off, job.block_off + job.len);
        let frames = (start / FRAME) as u32..end.div_ceil(FRAME) as u32;
        let got = futures::future::join_all(frames.clone().map(|f| self.frame(job.key, f, &job.servers))).await;
        let mut pieces = Vec::with_capacity(got.len());
        let mut at = start;
        for (f, piece) in frames.zip(got) {
            let (piece, base) = piece?;
            let stop = end.min((f as usize + 1) * FRAME);
            pieces.push((piece, at - base, stop - at));
            at = stop;
        }
        Ok(pieces)
    }

    /// Warms the block cache for `[offset, offset + len)`.
    pub(crate) async fn prefetch(self: &Arc<Self>, ino: Ino, offset: u64, len: u64) {
        if let Ok(jobs) = self.plan(ino, offset, len).await {
            self.warm(jobs).await;
        }
    }

    /// Fetches the blocks `jobs` name into the cache, each once.
    async fn warm(&self, jobs: Vec<Copy>) {
        let mut keys: Vec<_> = jobs.into_iter().map(|j| (j.key, j.servers)).collect();
        keys.dedup_by_key(|(k, _)| *k);
        futures::future::join_all(keys.iter().map(|(k, s)| self.block(*k, s))).await;
    }

    /// Remembers what a directory page asked for at `epoch` tells of its empty and small
    /// files (see `OpenHint`).
    pub(crate) fn note_open_hints(&self, dir: Ino, entries: &mut [DirEntry], epoch: u64) {
        let page = Arc::new(entries.iter().map(|e| e.ino).collect::<Vec<_>>());
        for (pos, e) in entries.iter_mut().enumerate() {
            let map = e.first_map.take();
            if let Some(attr) = &e.attr {
                self.keep_open_hint(attr, map, epoch, Some((dir, page.clone(), pos)));
            }
        }
    }

    /// Keeps what an open of the file `attr` describes would answer, if the answer `map` came
    /// with is one: no map for an empty file, chunk 0's for a small one.
    fn keep_open_hint(
        &self,
        attr: &Attr,
        map: Option<Vec<SliceRef>>,
        epoch: u64,
        order: Option<(Ino, Arc<Vec<Ino>>, usize)>,
    ) {
        if attr.kind == FileKind::File && (map.is_some() || attr.size == 0) {
            let hint = OpenHint { attr: attr.clone(), map: map.map(Arc::new), epoch, order };
            self.open_hints.insert(attr.ino, hint);
        }
    }

    /// Files of `dir` listed for the kernel from a cached listing, in `entries`' order (not
    /// the server's): opens that follow it are in listing order (see
    /// [`Client::read_ahead_files`]).
    pub(crate) fn reorder_open_hints(&self, dir: Ino, entries: &[DirEntry]) {
        let page = Arc::new(entries.iter().map(|e| e.ino).collect::<Vec<_>>());
        for (pos, e) in entries.iter().enumerate() {
            if let Some(mut hint) = self.open_hints.get(&e.ino) {
                hint.order = Some((dir, page.clone(), pos));
                self.open_hints.insert(e.ino, hint);
            }
        }
    }

    /// Starts fetching the data of the next files of `ino`'s directory when opens there
    /// follow listing order (`tar c`, `cp -r`, `grep -r`, any loop over a directory's files),
    /// as sequential reads of one file read ahead: each fetch waits on a chunk server's disk,
    /// and a run of them in parallel waits about once.
    pub(crate) fn read_ahead_files(self: &Arc<Self>, ino: Ino) {
        let Some(OpenHint { order: Some((dir, page, pos)), .. }) = self.open_hints.get(&ino) else { return };
        // The same page as the last open here: a `Weak` keeps its allocation, so its address
        // cannot be another page's meanwhile.
        let (last, ahead) = match self.opens_in_dirs.get(&dir) {
            Some((p, last, ahead)) if std::ptr::eq(p.as_ptr(), Arc::as_ptr(&page)) => (Some(last), ahead.max(pos)),
            _ => (None, pos),
        };
        let to = match last.is_some_and(|l| l + 1 == pos) {
            true => (pos + FILES_AHEAD).min(page.len() - 1),
            false => ahead,
        };
        self.opens_in_dirs.insert(dir, (Arc::downgrade(&page), pos, to));
        for &next in page.get(ahead + 1..=to).unwrap_or_default() {
            let _ = self.prefetch_hinted(next);
        }
    }

    /// Keeps what the server's answer to `req` (given at `epoch`, with nothing else changing
    /// the file meanwhile) says an open of a file would answer: the open's own answer, a
    /// commit's (attributes and, for a small file, chunk 0's map) and an empty file's
    /// creation. A file this client wrote (`git clone`, then `git status` reading it back)
    /// or opens again is then opened without the server under the solo lease.
    pub(crate) fn note_open_answer(&self, req: &MetaRequest, resp: &MetaResponse, epoch: u64) {
        let (attr, map) = match (req, resp) {
            (_, MetaResponse::Opened { attr, first_map } | MetaResponse::Committed { attr, first_map }) => {
                (attr, first_map.clone())
            }
            (MetaRequest::MakeNode { .. }, MetaResponse::Changed { attr: Some(attr), .. }) => (attr, None),
            _ => return,
        };
        self.keep_open_hint(attr, map, epoch, None);
    }

    /// Starts fetching a small file's data by the map its hint gave, before the open that
    /// brings the current map returns. Blocks never change, so a stale map only costs a
    /// fetch of a block the reads may not need.
    /// Returns the map it fetched by, if any.
    pub(crate) fn prefetch_hinted(self: &Arc<Self>, ino: Ino) -> Option<Arc<Vec<SliceRef>>> {
        let Some(OpenHint { attr, map: Some(map), .. }) = self.open_hints.get(&ino) else { return None };
        if attr.size > crate::namespace::PREFETCH_ON_OPEN {
            return None;
        }
        let mut jobs = Vec::new();
        self.plan_chunk(&map, 0, attr.size.min(self.volume.chunk_size), 0, &mut jobs);
        let client = self.clone();
        tokio::spawn(async move { client.warm(jobs).await });
        Some(map)
    }

    /// Which parts of which blocks make up `[offset, offset + len)` of a file.
    async fn plan(self: &Arc<Self>, ino: Ino, offset: u64, len: u64) -> Result<Vec<Copy>> {
        let cs = self.volume.chunk_size;
        let mut jobs = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let chunk = pos / cs;
            let chunk_start = chunk * cs;
            let stop = end.min(chunk_start + cs);
            let map = self.chunk_map(ino, chunk).await?;
            self.plan_chunk(&map, pos - chunk_start, stop - chunk_start, pos - offset, &mut jobs);
            pos = stop;
        }
        Ok(jobs)
    }

    /// Adds to `jobs` the copies that make up `[from, to)` of a chunk whose slices are `map`;
    /// the byte at `from` lands at `out_at` of the output.
    pub(crate) fn plan_chunk(&self, map: &[SliceRef], from: u64, to: u64, out_at: u64, jobs: &mut Vec<Copy>) {
        let bs = self.volume.block_size;
        for piece in resolve(map, from, to) {
            let Some(slice) = piece.slice else { continue };
            let mut at = piece.start;
            while at < piece.end {
                let in_slice = at - slice.pos as u64;
                let block_off = in_slice % bs;
                let n = (bs - block_off).min(piece.end - at);
                jobs.push(Copy {
                    key: BlockKey { slice: slice.id, index: (in_slice / bs) as u32 },
                    servers: slice.servers.clone(),
                    block_len: bs.min(slice.len as u64 - (in_slice - block_off)) as usize,
                    block_off: block_off as usize,
                    out_off: (out_at + at - from) as usize,
                    len: n as usize,
                });
                at += n;
            }
        }
    }
}

/// Copy `len` bytes from `block_off` in a block to `out_off` in the read buffer.
pub(crate) struct Copy {
    key: BlockKey,
    servers: Vec<ServerId>,
    /// Bytes of the whole block.
    block_len: usize,
    block_off: usize,
    out_off: usize,
    len: usize,
}
