//! What the metadata server reports to Prometheus besides its requests: the volume's size and
//! files, the chunk servers by state, clients and leases, and repair progress. Set at each
//! scrape from the state the server keeps anyway, so serving requests pays nothing for them.

use crate::service::MetaService;
use cairn_metrics::{Counter, Gauge, Metrics, catch_up};
use std::sync::atomic::Ordering::Relaxed;

/// The metadata server's own gauges and counters (registered once, set when scraped).
pub(crate) struct MetaGauges {
    files: Gauge,
    capacity: Gauge,
    free: Gauge,
    servers_alive: Gauge,
    servers_dead: Gauge,
    servers_draining: Gauge,
    clients: Gauge,
    read_leases: Gauge,
    write_leases: Gauge,
    short_slices: Gauge,
    lost_slices: Gauge,
    recalls: Counter,
    repaired: Counter,
    moved: Counter,
    bad_copies: Counter,
    orphans_deleted: Counter,
    grouped_commits: Counter,
}

impl MetaGauges {
    pub(crate) fn register(m: &mut Metrics) -> MetaGauges {
        MetaGauges {
            files: m.gauge("files", "Inodes in the volume"),
            capacity: m
                .gauge("capacity_bytes", "Bytes the live chunk servers can hold, divided by the copies per block"),
            free: m.gauge("free_bytes", "Free bytes on the live chunk servers, divided by the copies per block"),
            servers_alive: m.gauge("chunk_servers_alive", "Chunk servers heard from lately and not draining"),
            servers_dead: m.gauge("chunk_servers_dead", "Chunk servers not heard from for dead_after_secs"),
            servers_draining: m.gauge("chunk_servers_draining", "Live chunk servers being drained"),
            clients: m.gauge("clients", "Client connections (mounts and admin commands)"),
            read_leases: m.gauge("read_leases", "Inodes some client holds a read lease on"),
            write_leases: m.gauge("write_leases", "Files some client holds the write lease on"),
            short_slices: m.gauge("short_slices", "Slices short of copies at the last repair scan"),
            lost_slices: m.gauge("lost_slices", "Slices with no live copy at the last repair scan"),
            recalls: m.counter("recalls", "Lease recalls started"),
            repaired: m.counter("repaired_slices", "Slices given new copies"),
            moved: m.counter("moved_slices", "Slices moved to another chunk server (drain, rebalance)"),
            bad_copies: m.counter("bad_copies", "Corrupt copies reported by chunk servers"),
            orphans_deleted: m.counter("orphans_deleted", "Orphaned slices deleted by reconciliation"),
            grouped_commits: m.counter("grouped_commits", "Commits applied in one transaction with others"),
        }
    }
}

impl MetaService {
    /// Sets the gauges and counters of [`MetaGauges`] from the server's state.
    pub(crate) async fn refresh_metrics(&self) {
        let g = &self.gauges;
        match crate::store::reads::inode_count(&self.store.readers).await {
            Ok(n) => {
                g.files.set(n as i64);
            }
            Err(e) => tracing::warn!("metrics: counting inodes: {e}"),
        }
        let (capacity, free) = self.space();
        g.capacity.set(capacity as i64);
        g.free.set(free as i64);
        let servers = self.registry.list();
        let count = |f: fn(&cairn_proto::ChunkServerInfo) -> bool| servers.iter().filter(|s| f(s)).count() as i64;
        g.servers_alive.set(count(|s| s.alive && !s.draining));
        g.servers_dead.set(count(|s| !s.alive));
        g.servers_draining.set(count(|s| s.alive && s.draining));
        let (clients, readers, writers) = self.leases.counts();
        g.clients.set(clients as i64);
        g.read_leases.set(readers as i64);
        g.write_leases.set(writers as i64);
        let r = &self.repair_stats;
        g.short_slices.set(r.short.load(Relaxed) as i64);
        g.lost_slices.set(r.lost.load(Relaxed) as i64);
        catch_up(&g.recalls, self.leases.recalls());
        catch_up(&g.repaired, r.repaired.load(Relaxed));
        catch_up(&g.moved, r.moved.load(Relaxed));
        catch_up(&g.bad_copies, r.bad.load(Relaxed));
        catch_up(&g.orphans_deleted, r.orphans.load(Relaxed));
        catch_up(&g.grouped_commits, self.commits.grouped());
    }
}
