//! Reconciliation: a chunk server can hold slices no file references there any more: copies
//! repaired or moved elsewhere while it was away, slices deleted while it was down, writes
//! that never committed, copies found corrupt. Now and then (and soon after a server
//! (re)joins) the metadata server lists each live server's slices and deletes those that no
//! slice row names that server for, once they have been seen so for the whole grace period:
//! a write in progress has committed by then, and a reader that looked up the old holders
//! has finished.

use crate::service::{MetaService, chunk_client};
use crate::store::reads;
use cairn_net::RpcClient;
use cairn_proto::chunk::{BlockKey, ChunkRequest, ChunkResponse};
use cairn_proto::*;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Deadline of one listing or delete call.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Orphans found so far and when each was first seen, per server.
#[derive(Default)]
pub(crate) struct Reconciler {
    orphans: HashMap<ServerId, HashMap<SliceId, Instant>>,
    /// When each server was last reconciled, and whether it was alive at the last look.
    last: HashMap<ServerId, Instant>,
    alive: HashSet<ServerId>,
}

impl Reconciler {
    /// Reconciles the live servers whose turn has come: every quarter of the grace period, and
    /// at once when a server (re)joins.
    pub(crate) async fn run_due(
        &mut self,
        svc: &MetaService,
        servers: &[ChunkServerInfo],
        endpoint: &quinn::Endpoint,
        clients: &mut HashMap<ServerId, RpcClient>,
    ) {
        let every = (svc.orphan_grace / 4).max(Duration::from_secs(1));
        for s in servers {
            if !s.alive {
                self.alive.remove(&s.id);
                continue;
            }
            let rejoined = self.alive.insert(s.id);
            if !rejoined && self.last.get(&s.id).is_some_and(|t| t.elapsed() < every) {
                continue;
            }
            self.visit(svc, s, endpoint, clients).await;
        }
    }

    /// Reconciles every live server now (`cairn gc`), whatever its turn.
    pub(crate) async fn run_all(
        &mut self,
        svc: &MetaService,
        servers: &[ChunkServerInfo],
        endpoint: &quinn::Endpoint,
        clients: &mut HashMap<ServerId, RpcClient>,
    ) -> Vec<GcServer> {
        let mut report = Vec::new();
        for s in servers.iter().filter(|s| s.alive) {
            self.alive.insert(s.id);
            report.push(self.visit(svc, s, endpoint, clients).await);
        }
        report
    }

    /// Reconciles one server and says what it found (a failure is logged and reported).
    async fn visit(
        &mut self,
        svc: &MetaService,
        s: &ChunkServerInfo,
        endpoint: &quinn::Endpoint,
        clients: &mut HashMap<ServerId, RpcClient>,
    ) -> GcServer {
        self.last.insert(s.id, Instant::now());
        let client = chunk_client(clients, endpoint, s, CALL_TIMEOUT);
        self.reconcile(svc, s.id, client).await.unwrap_or_else(|e| {
            warn!(server = s.id, "reconcile: {e}");
            GcServer { id: s.id, error: Some(e.to_string()), ..GcServer::default() }
        })
    }

    /// Lists one server's blocks a bucket at a time and deletes the orphans whose grace is over.
    async fn reconcile(&mut self, svc: &MetaService, server: ServerId, client: &RpcClient) -> crate::Result<GcServer> {
        let known = self.orphans.remove(&server).unwrap_or_default();
        let mut orphans = HashMap::new();
        let mut deleted = 0;
        let mut listed = 0;
        for bucket in 0..=255u8 {
            let blocks = match client.call::<_, ChunkResponse>(&ChunkRequest::List { bucket }).await {
                Ok((ChunkResponse::Blocks(b), _)) => b,
                Ok(_) => return Err(crate::MetaError::fs(ErrorCode::Io, "unexpected answer to List")),
                Err(e) => {
                    // Keep what was learnt: the next round picks up from there.
                    self.orphans.insert(server, known);
                    return Err(crate::MetaError::fs(e.code(), e.to_string()));
                }
            };
            let slices: Vec<SliceId> = {
                let mut v: Vec<_> = blocks.iter().map(|k| k.slice).collect();
                v.dedup();
                v
            };
            if slices.is_empty() {
                continue;
            }
            listed += slices.len() as u64;
            let held = reads::held_on(&svc.store.readers, server, &slices).await?;
            let mut expired = HashSet::new();
            for slice in slices.into_iter().filter(|s| !held.contains(s)) {
                let seen = known.get(&slice).copied().unwrap_or_else(Instant::now);
                if seen.elapsed() >= svc.orphan_grace {
                    expired.insert(slice);
                } else {
                    orphans.insert(slice, seen);
                }
            }
            if expired.is_empty() {
                continue;
            }
            let keys: Vec<BlockKey> = blocks.into_iter().filter(|k| expired.contains(&k.slice)).collect();
            client
                .call::<_, ChunkResponse>(&ChunkRequest::Delete { keys })
                .await
                .map_err(|e| crate::MetaError::fs(e.code(), e.to_string()))?;
            deleted += expired.len() as u64;
        }
        if deleted > 0 {
            svc.repair_stats.orphans.fetch_add(deleted, Ordering::Relaxed);
            info!(server, slices = deleted, "reconcile: deleted orphaned slices");
        }
        let report = GcServer {
            id: server,
            slices: listed,
            waiting: orphans.len() as u64,
            oldest_secs: orphans.values().map(|seen| seen.elapsed().as_secs()).max().unwrap_or(0),
            deleted,
            error: None,
        };
        self.orphans.insert(server, orphans);
        Ok(report)
    }
}
