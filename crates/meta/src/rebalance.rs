//! Rebalancing: when a server joins (or one filled up earlier than the others), slices move
//! from the server holding the most, relative to its capacity, to the one holding the least,
//! until they differ by less than `rebalance_threshold_mib`. A move is a copy to the new
//! server and then a change of the slice's holders; the old copy becomes an orphan that
//! reconciliation deletes after the grace period, so a reader that looked the slice up just
//! before still finds it.

use crate::service::MetaService;
use crate::store::reads;
use cairn_net::RpcClient;
use cairn_proto::*;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tracing::info;

/// Slices moved per round at most; the repair loop comes back for more.
const MOVES_PER_ROUND: usize = 64;

impl MetaService {
    /// Moves some slices from the fullest live server to the emptiest one if they differ by
    /// more than the threshold; true if it moved any.
    pub(crate) async fn rebalance(
        &self,
        servers: &[ChunkServerInfo],
        held: &HashMap<ServerId, (u64, u64)>,
        endpoint: &quinn::Endpoint,
        clients: &mut HashMap<ServerId, RpcClient>,
    ) -> crate::Result<bool> {
        let Some((from, to, mut excess)) = self.imbalance(servers, held) else { return Ok(false) };
        let to_zone = &servers.iter().find(|s| s.id == to).expect("target is listed").zone;
        let zone_of = |id: &ServerId| servers.iter().find(|s| s.id == *id).map(|s| s.zone.as_str());
        let (mut moved, mut after) = (0, 0);
        while moved < MOVES_PER_ROUND && excess > 0 {
            let page = reads::slice_holders(&self.store.readers, after, 2048).await?;
            let Some(last) = page.last() else { break };
            after = last.0;
            for (_, slice, len, holders) in page {
                // One copy per zone: no other holder may be in the target's zone.
                if !holders.contains(&from) || holders.iter().any(|h| *h != from && zone_of(h) == Some(to_zone)) {
                    continue;
                }
                let t0 = Instant::now();
                if !self.copy_slice(slice, len, from, to, servers, endpoint, clients).await {
                    return Ok(moved > 0);
                }
                let new: Vec<_> = holders.iter().map(|h| if *h == from { to } else { *h }).collect();
                self.set_holders(slice, &new).await?;
                self.repair_stats.moved.fetch_add(1, Ordering::Relaxed);
                moved += 1;
                // Each move narrows the gap by twice its size (one side loses, the other gains).
                excess = excess.saturating_sub(len.max(1) * 2);
                // Work at most half the time.
                tokio::time::sleep(t0.elapsed()).await;
                if moved >= MOVES_PER_ROUND || excess == 0 {
                    break;
                }
            }
        }
        if moved > 0 {
            info!(from, to, slices = moved, "rebalance: moved slices");
        }
        Ok(moved > 0)
    }

    /// The fullest and the emptiest live, non-draining server (bytes held scaled to the mean
    /// capacity) and by how much the gap exceeds the threshold, if it does.
    fn imbalance(
        &self,
        servers: &[ChunkServerInfo],
        held: &HashMap<ServerId, (u64, u64)>,
    ) -> Option<(ServerId, ServerId, u64)> {
        if self.rebalance_threshold == 0 {
            return None;
        }
        let live: Vec<_> = servers.iter().filter(|s| s.alive && !s.draining && s.capacity > 0).collect();
        if live.len() < 2 {
            return None;
        }
        let mean_cap = live.iter().map(|s| s.capacity as f64).sum::<f64>() / live.len() as f64;
        let scaled = |s: &ChunkServerInfo| held.get(&s.id).map_or(0, |h| h.1) as f64 * mean_cap / s.capacity as f64;
        let most = live.iter().max_by(|a, b| scaled(a).total_cmp(&scaled(b)))?;
        let least = live.iter().min_by(|a, b| scaled(a).total_cmp(&scaled(b)))?;
        let gap = scaled(most) - scaled(least);
        (gap > self.rebalance_threshold as f64 && least.free > least.capacity / 20)
            .then(|| (most.id, least.id, (gap - self.rebalance_threshold as f64 / 2.0) as u64))
    }
}
