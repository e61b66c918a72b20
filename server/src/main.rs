//! `cairn`: runs the servers and administers volumes.

mod admin;
mod bench;
mod format;
mod local;
mod status;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "cairn", version, about = "Cairn distributed POSIX filesystem")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new volume: cluster CA, certificates, volume key, metadata database, configs.
    Format(format::FormatArgs),
    /// Run the metadata server.
    Meta {
        /// Path of meta.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a chunk server (`--config`), or administer one (`cairn chunk drain`).
    #[command(args_conflicts_with_subcommands = true)]
    Chunk {
        /// Path of a chunk server's TOML file.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: Option<admin::ChunkCommand>,
    },
    /// An all-in-one cluster on this machine (metadata server, chunk servers, mount).
    Local {
        #[command(subcommand)]
        command: local::LocalCommand,
    },
    /// Show servers, capacity and files of a volume.
    Status(status::StatusArgs),
    /// Check the volume's metadata for inconsistencies (exit status 1 if any).
    Fsck(admin::VolumeDir),
    /// Delete now what reconciliation would delete in turn: copies no file references whose
    /// grace period is over; report what still waits.
    Gc(admin::VolumeDir),
    /// Add a volume key: new data is encrypted with it (see docs/KEYS.md).
    KeyRotate {
        /// Volume directory holding meta.toml.
        #[arg(long, default_value = local::DEFAULT_DATA)]
        data: PathBuf,
    },
    /// Measure a directory (on a Cairn mount) beside others (a local disk) with one workload.
    Bench(bench::BenchArgs),
    /// Show how many requests of each kind a mount has sent to the servers.
    Stats {
        /// The mountpoint (or any path on the mount).
        path: PathBuf,
    },
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Servers log to files (`cairn local` sends stderr there): no color codes in them.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Format(args) => format::run(&args).map(|_| ()),
        Command::Meta { config } => run_meta(&config),
        Command::Chunk { command: Some(command), .. } => admin::chunk(command),
        Command::Chunk { config: Some(config), .. } => run_chunk(&config),
        Command::Chunk { config: None, command: None } => {
            Err(anyhow::anyhow!("`cairn chunk` needs --config FILE (run a server) or a command (drain)"))
        }
        Command::Fsck(args) => admin::fsck(&args),
        Command::Gc(args) => admin::gc(&args),
        Command::Local { command } => local::run(command),
        Command::Status(args) => status::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Stats { path } => status::mount_stats(&path),
        Command::KeyRotate { data } => rotate_key(&data),
    };
    if let Err(e) = result {
        eprintln!("cairn: {e:#}");
        std::process::exit(1);
    }
}

fn rotate_key(data: &std::path::Path) -> anyhow::Result<()> {
    let meta: cairn_config::MetaFile = cairn_config::load(&data.join("meta.toml"))?;
    let id = cairn_config::append_key(&meta.key_file, &rand::random())?;
    println!(
        "added volume key {id} to {}: clients that mount from now on encrypt new data with it; \
         keep the older keys, data written under them still needs them",
        meta.key_file.display()
    );
    Ok(())
}

fn run_meta(path: &std::path::Path) -> anyhow::Result<()> {
    init_tracing();
    let f: cairn_config::MetaFile = cairn_config::load(path)?;
    let config = cairn_meta::MetaConfig {
        listen: f.listen.parse().with_context(|| format!("listen address {:?}", f.listen))?,
        db: f.database,
        ca: f.tls.ca,
        cert: f.tls.cert,
        key: f.tls.key,
        dead_after: Duration::from_secs(f.dead_after_secs.max(1)),
        key_file: f.key_file,
        orphan_grace: Duration::from_secs(f.orphan_grace_secs.max(1)),
        lock_grace: Duration::from_secs(f.lock_grace_secs),
        rebalance_threshold: f.rebalance_threshold_mib << 20,
        metrics: metrics_addr(f.metrics_listen.as_deref())?,
    };
    // One thread: every SQL statement is a handoff to sqlx's SQLite worker thread, and a single
    // runtime thread on the other side of it wakes faster than a work-stealing pool.
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(cairn_meta::run(config))?;
    Ok(())
}

fn metrics_addr(listen: Option<&str>) -> anyhow::Result<Option<std::net::SocketAddr>> {
    listen.map(|l| l.parse().with_context(|| format!("metrics_listen address {l:?}"))).transpose()
}

fn run_chunk(path: &std::path::Path) -> anyhow::Result<()> {
    init_tracing();
    let f: cairn_config::ChunkFile = cairn_config::load(path)?;
    let config = cairn_chunk::ChunkConfig {
        id: f.id,
        listen: f.listen.parse().with_context(|| format!("listen address {:?}", f.listen))?,
        advertise: f.advertise.unwrap_or_else(|| f.listen.clone()),
        meta: f.meta,
        data_dir: f.data_dir,
        ca: f.tls.ca,
        cert: f.tls.cert,
        key: f.tls.key,
        heartbeat: Duration::from_millis(f.heartbeat_ms.max(50)),
        zone: f.zone.unwrap_or_else(|| format!("server-{}", f.id)),
        scrub: cairn_chunk::ScrubConfig {
            bytes_per_sec: f.scrub_mib_per_sec << 20,
            interval: Duration::from_secs(f.scrub_interval_secs.max(1)),
        },
        metrics: metrics_addr(f.metrics_listen.as_deref())?,
    };
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(cairn_chunk::run(config))?;
    Ok(())
}
