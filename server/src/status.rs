//! `cairn status`: what the metadata server knows about servers, capacity and files.

use crate::format::ClusterFile;
use anyhow::Context;
use std::path::PathBuf;

/// Options of `cairn status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Volume directory written by `cairn format` / `cairn local up`.
    #[arg(long, default_value = crate::local::DEFAULT_DATA)]
    pub data: PathBuf,
}

/// Connects as a client and prints the cluster's state.
pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    let cluster: ClusterFile = cairn_config::load(&args.data.join("cluster.toml"))?;
    let rt = crate::runtime()?;
    rt.block_on(async {
        let client = crate::local::connect(&args.data, &cluster, std::time::Duration::from_secs(3)).await?;
        let stats = client.statfs().await?;
        let servers = client.list_servers().await?;
        // Another client connected keeps the mount from holding the solo lease.
        client.disconnect().await;
        let v = client.volume();
        println!("volume      {} ({})", v.name, cluster.source());
        println!("uuid        {}", v.uuid);
        let zones: std::collections::HashSet<_> =
            servers.iter().filter(|s| s.alive && !s.draining).map(|s| &s.zone).collect();
        match zones.len() < v.replication as usize {
            true => println!(
                "replication {} (warning: {} live failure domain(s), so blocks get {} cop{})",
                v.replication,
                zones.len(),
                zones.len().max(1),
                if zones.len() > 1 { "ies" } else { "y" }
            ),
            false => println!("replication {}", v.replication),
        }
        println!("files       {}", stats.files);
        let endpoints = metrics_endpoints(&args.data, &cluster);
        if !endpoints.is_empty() {
            println!("metrics     {}", endpoints.join(", "));
        }
        println!("capacity    {:.1} GiB, {:.1} GiB free", gib(stats.capacity), gib(stats.free));
        println!(
            "repair      {} slices short of copies, {} with no live copy, {} re-replicated since start",
            stats.short_slices, stats.lost_slices, stats.repaired_slices
        );
        println!(
            "maintenance {} slices moved (drain, rebalance), {} corrupt copies reported, {} orphaned slices deleted",
            stats.moved_slices, stats.bad_copies, stats.orphans_deleted
        );
        println!("chunk servers:");
        for s in servers {
            let state = match (s.alive, s.draining) {
                (false, _) => "DEAD",
                (true, true) => "draining",
                (true, false) => "alive",
            };
            let (free, cap) = (gib(s.free), gib(s.capacity));
            println!(
                "  {:>4}  {:<22} {:<12} {:<8}  {free:.1}/{cap:.1} GiB free  {} slices, {}",
                s.id,
                s.addr,
                s.zone,
                state,
                s.slices,
                human(s.bytes)
            );
        }
        Ok::<_, anyhow::Error>(())
    })
    .context("querying the metadata server")
}

/// The Prometheus endpoints the volume directory's configurations set, as `who http://…`.
fn metrics_endpoints(dir: &std::path::Path, cluster: &ClusterFile) -> Vec<String> {
    let url = |l: Option<String>| l.map(|l| format!("http://{l}/metrics"));
    let meta = cairn_config::load::<cairn_config::MetaFile>(&dir.join("meta.toml")).ok();
    let mut out: Vec<String> =
        url(meta.and_then(|m| m.metrics_listen)).map(|u| format!("meta {u}")).into_iter().collect();
    for id in &cluster.chunk_servers {
        let chunk = cairn_config::load::<cairn_config::ChunkFile>(&dir.join(format!("chunk-{id}.toml"))).ok();
        out.extend(url(chunk.and_then(|c| c.metrics_listen)).map(|u| format!("chunk {id} {u}")));
    }
    out
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Bytes in MiB below 1 GiB, in GiB above.
pub fn human(b: u64) -> String {
    match b < 1 << 30 {
        true => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        false => format!("{:.1} GiB", gib(b)),
    }
}

/// Prints a mount's request counters (`cairn stats`), read with an ioctl on `path`.
pub fn mount_stats(path: &std::path::Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; cairn_proto::STATS_IOCTL_BYTES];
    // SAFETY: the buffer has the size the ioctl number encodes, and outlives the call.
    let rc =
        unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), cairn_proto::STATS_IOCTL as _, buf.as_mut_ptr()) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        anyhow::bail!("{} is not on a Cairn mount (or its client is too old): {e}", path.display());
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    print!("{}", String::from_utf8_lossy(&buf[..end]));
    Ok(())
}
