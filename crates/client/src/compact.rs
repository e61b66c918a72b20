//! Compaction: every flushed write buffer becomes a slice, so many small writes (a database,
//! fsx, random 4 KiB writes) leave a chunk with thousands of slices that every read must fetch
//! and resolve. When a chunk's map grows past [`COMPACT_SLICES`], the client rewrites the
//! block-sized windows holding most of them as one slice each (`MetaRequest::Compact`).
//!
//! Safe against concurrent writers: the new slice holds a window's bytes as of the map's
//! newest commit, and the metadata server refuses it if anything newer overlaps the window.
//! The new blocks are fsynced before the commit, so no fsynced byte depends on unsynced data.

use crate::{Client, Result, unexpected};
use cairn_proto::meta::{MetaRequest, MetaResponse};
use cairn_proto::*;
use std::collections::HashSet;
use std::sync::Arc;

/// Slices in one chunk's map beyond which reads trigger a compaction of that chunk.
pub(crate) const COMPACT_SLICES: usize = 64;

/// A window is rewritten only if at least this many slices lie entirely inside it.
const MIN_SLICES_PER_WINDOW: usize = 4;

impl Client {
    /// Compacts chunk `chunk` of `ino` in the background if its map (of `slices` entries) is
    /// fragmented and no compaction of that chunk is running already.
    pub(crate) fn maybe_compact(self: &Arc<Self>, ino: Ino, chunk: u64, slices: usize) {
        if slices < COMPACT_SLICES || !self.compacting.insert((ino, chunk)) {
            return;
        }
        let client = self.clone();
        tokio::spawn(async move {
            if let Err(e) = client.compact(ino, chunk).await {
                tracing::debug!(ino, chunk, error = %e, "compaction skipped");
            }
            client.compacting.remove(&(ino, chunk));
        });
    }

    async fn compact(self: &Arc<Self>, ino: Ino, chunk: u64) -> Result<()> {
        let bs = self.volume.block_size;
        let (map, _) = self.read_map(ino, chunk).await?;
        let mut per_window = std::collections::BTreeMap::<u64, usize>::new();
        for w in map.iter().map(|s| s.pos as u64 / bs) {
            *per_window.entry(w).or_default() += 1;
        }
        let mut windows: Vec<(usize, u64)> = per_window
            .keys()
            .map(|&w| (inside(&map, w * bs, (w + 1) * bs).count(), w))
            .filter(|(n, _)| *n >= MIN_SLICES_PER_WINDOW)
            .collect();
        windows.sort_unstable_by(|a, b| b.cmp(a));
        for (_, w) in windows {
            // A fresh map per window: each rewrite changes it.
            let (map, seq) = self.read_map(ino, chunk).await?;
            // The new slice reproduces the map over the replaced rows' extent, past the end of
            // the file too (where holes make it zeros), so it changes nothing a read sees.
            let from = w * bs;
            let Some(to) = inside(&map, from, (w + 1) * bs).map(|s| s.pos as u64 + s.len as u64).max() else {
                continue;
            };
            let mut jobs = Vec::new();
            self.plan_chunk(&map, from, to, 0, &mut jobs);
            let mut data = vec![0u8; (to - from) as usize];
            self.fill(&jobs, &mut data, false).await?;
            let id = self.next_slice_id().await?;
            let servers = self.store_slice(id, data, true).await?;
            let slice = SliceRef { pos: from as u32, len: (to - from) as u32, id, servers };
            self.call_empty(MetaRequest::Compact { ino, chunk, seq, slice }).await?;
            self.invalidate_data(ino);
            // The replaced slices' blocks will be deleted: an fsync must not wait for them
            // any more (their bytes are in the new slice, stored with fsync).
            let replaced: HashSet<SliceId> = inside(&map, from, to).map(|s| s.id).collect();
            if let Some(mut keys) = self.unsynced.get_mut(&ino) {
                keys.retain(|(_, k)| !replaced.contains(&k.slice));
            }
        }
        Ok(())
    }

    /// A chunk's slices straight from the metadata server, with the newest one's position.
    pub(crate) async fn read_map(&self, ino: Ino, chunk: u64) -> Result<(Vec<SliceRef>, u64)> {
        match self.call(MetaRequest::ReadMap { ino, chunk }).await? {
            MetaResponse::Map { slices, seq } => Ok((slices, seq)),
            other => Err(unexpected(other)),
        }
    }
}

/// The slices that lie entirely inside `[from, to)`: those a compaction of it replaces.
fn inside(map: &[SliceRef], from: u64, to: u64) -> impl Iterator<Item = &SliceRef> {
    map.iter().filter(move |s| s.pos as u64 >= from && s.pos as u64 + s.len as u64 <= to)
}
