//! `cairn format`: everything a new volume needs, written into one directory.
//!
//! ```text
//! DIR/cluster.toml          what `cairn local` and `cairn status` need: volume, addresses
//! DIR/tls/ca.pem, ca.key    the cluster CA (keep ca.key offline in real deployments)
//! DIR/tls/{meta,chunk,client}.{pem,key}   node certificates signed by the CA
//! DIR/volume.key            the volume's data keys, 32 random bytes each (docs/KEYS.md)
//! DIR/meta.toml, meta.db    metadata server config and SQLite database
//! DIR/chunk-N.toml, chunk-N/   chunk server N config and block directory
//! DIR/client.toml           client settings for mount.cairn
//! ```

use anyhow::{Context, bail};
use cairn_config::{ChunkFile, ClientFile, MetaFile, Tls};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Options of `cairn format`.
#[derive(clap::Args, Debug, Clone)]
pub struct FormatArgs {
    /// Directory for the volume's files (created if missing; must not hold a volume yet).
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// Metadata server address; port 0 picks a free port now and keeps it.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub meta_listen: String,
    /// Number of chunk server configurations to create.
    #[arg(long, default_value_t = 3)]
    pub chunk_servers: u32,
    /// Host the chunk servers listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub chunk_host: String,
    /// Failure domain of every chunk server configured here (default: each its own, as when
    /// each runs on its own machine).
    #[arg(long)]
    pub chunk_zone: Option<String>,
}

/// The settings a volume is formatted with (`cairn format`, and `cairn local up` on first
/// use); they cannot change afterwards.
#[derive(clap::Args, Debug, Clone)]
pub struct VolumeArgs {
    /// Volume name, as used in the mount source HOST:PORT:/NAME.
    #[arg(long, default_value = "cairn")]
    pub volume: String,
    /// Copies of every block. Fewer are made while fewer failure domains (zones; by default
    /// one per chunk server) are live, with a warning in the metadata server's log and in
    /// `cairn status`.
    #[arg(long, default_value_t = 3)]
    pub replication: u32,
    /// zstd level file data is compressed with (1 fast … 19 small, negative faster still; 0
    /// stores it uncompressed). Blocks that do not shrink are stored as they are.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-7..=19))]
    pub compression: i32,
    /// Store file data in the clear on the chunk servers (default: encrypted by the clients
    /// under the volume key, so chunk servers only hold ciphertext).
    #[arg(long)]
    pub no_encryption: bool,
}

/// `cluster.toml`: the shape of a formatted volume directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// Volume name.
    pub volume: String,
    /// Metadata server address clients use.
    pub meta: String,
    /// Ids of the chunk servers configured in this directory (chunk-<id>.toml).
    pub chunk_servers: Vec<u64>,
    /// Host new chunk servers listen on.
    pub chunk_host: String,
    /// Zone written into new chunk server configurations (none: each server its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_zone: Option<String>,
}

impl ClusterFile {
    /// The mount source naming this volume.
    pub fn source(&self) -> String {
        format!("{}:/{}", self.meta, self.volume)
    }
}

impl cairn_config::HasTls for ClusterFile {
    fn resolve_paths(&mut self, _dir: &Path) {}
}

/// A port on `host` that `bind` finds free now, for a server to bind later. Taken at random
/// below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), which is where a
/// socket asking for any free port gets one: a port from that range could be handed to some
/// client socket (a mount, another test's cluster) before the server starts, which then
/// failed with "Address already in use". With no room below the range, any free port.
fn kept_port(host: &str, bind: impl Fn(u16) -> std::io::Result<u16>) -> anyhow::Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOWEST: u16 = 10_000;
    if ephemeral_low > LOWEST {
        for _ in 0..1000 {
            if let Ok(port) = bind(rand::random_range(LOWEST..ephemeral_low)) {
                return Ok(port);
            }
        }
    }
    bind(0).with_context(|| format!("binding a port on {host}"))
}

fn free_port(host: &str) -> anyhow::Result<u16> {
    kept_port(host, |p| std::net::UdpSocket::bind((host, p))?.local_addr().map(|a| a.port()))
}

/// A free TCP port on `host`, for a metrics endpoint.
fn free_tcp_port(host: &str) -> anyhow::Result<String> {
    let port = kept_port(host, |p| std::net::TcpListener::bind((host, p))?.local_addr().map(|a| a.port()))?;
    Ok(format!("{host}:{port}"))
}

fn with_free_port(addr: &str) -> anyhow::Result<String> {
    let (host, port) = addr.rsplit_once(':').with_context(|| format!("address {addr:?} is not HOST:PORT"))?;
    let port: u16 = port.parse().with_context(|| format!("port in {addr:?}"))?;
    let port = if port == 0 { free_port(host)? } else { port };
    Ok(format!("{host}:{port}"))
}

fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents)?;
    Ok(())
}

fn tls(name: &str) -> Tls {
    Tls { ca: "tls/ca.pem".into(), cert: format!("tls/{name}.pem").into(), key: format!("tls/{name}.key").into() }
}

/// Adds the configuration of chunk server `id` to a formatted directory.
pub fn add_chunk_server(dir: &Path, cluster: &mut ClusterFile, id: u64) -> anyhow::Result<()> {
    let listen = format!("{}:{}", cluster.chunk_host, free_port(&cluster.chunk_host)?);
    let file = ChunkFile {
        id,
        listen,
        advertise: None,
        meta: cluster.meta.clone(),
        data_dir: format!("chunk-{id}").into(),
        heartbeat_ms: 1000,
        zone: cluster.chunk_zone.clone(),
        scrub_mib_per_sec: 16,
        scrub_interval_secs: 7 * 24 * 3600,
        metrics_listen: Some(free_tcp_port(&cluster.chunk_host)?),
        tls: tls("chunk"),
    };
    std::fs::create_dir_all(dir.join(format!("chunk-{id}")))?;
    cairn_config::save(&dir.join(format!("chunk-{id}.toml")), &format!("Cairn chunk server {id}"), &file)?;
    cluster.chunk_servers.push(id);
    cairn_config::save(&dir.join("cluster.toml"), "Cairn volume directory", cluster)?;
    Ok(())
}

/// Gives chunk server `id` of a formatted directory new ports, both free now: it found its
/// own taken by another program when it started. Only a chunk server may move, since it
/// tells the metadata server its address at every heartbeat; clients and the mount source
/// know the metadata server's. The rest of its configuration is kept as written.
pub fn move_chunk_server(dir: &Path, id: u64) -> anyhow::Result<()> {
    let path = dir.join(format!("chunk-{id}.toml"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // Parsed as written (not `cairn_config::load`, which makes its paths absolute).
    let mut file: ChunkFile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let host = file.listen.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h).to_string();
    file.listen = format!("{host}:{}", free_port(&host)?);
    if file.metrics_listen.is_some() {
        file.metrics_listen = Some(free_tcp_port(&host)?);
    }
    cairn_config::save(&path, &format!("Cairn chunk server {id}"), &file)?;
    Ok(())
}

/// Creates the volume directory; fails if it already holds a volume.
pub fn run(args: &FormatArgs) -> anyhow::Result<ClusterFile> {
    let dir = &args.data;
    if dir.join("cluster.toml").exists() || dir.join("meta.db").exists() {
        bail!("{} already holds a volume; remove it first to format again", dir.display());
    }
    if args.volume.volume.is_empty() || args.volume.volume.contains(['/', ':', ',']) || args.volume.volume.len() > 64 {
        bail!("volume name {:?} must be 1-64 characters without '/', ':' or ','", args.volume);
    }
    std::fs::create_dir_all(dir.join("tls")).with_context(|| format!("creating {}", dir.display()))?;
    let meta = with_free_port(&args.meta_listen)?;
    let ca = cairn_net::pki::generate_ca(&args.volume.volume)?;
    write_private(&dir.join("tls/ca.key"), ca.key_pem.as_bytes())?;
    std::fs::write(dir.join("tls/ca.pem"), &ca.cert_pem)?;
    for (name, dns) in [
        ("meta", cairn_net::META_SERVER_NAME),
        ("chunk", cairn_net::CHUNK_SERVER_NAME),
        ("client", cairn_net::CLIENT_NAME),
    ] {
        let pair = cairn_net::pki::issue(&ca, &format!("cairn {name}"), &[dns])?;
        std::fs::write(dir.join(format!("tls/{name}.pem")), &pair.cert_pem)?;
        write_private(&dir.join(format!("tls/{name}.key")), pair.key_pem.as_bytes())?;
    }
    cairn_config::append_key(&dir.join("volume.key"), &rand::random())?;
    let meta_file = MetaFile {
        listen: meta.clone(),
        database: "meta.db".into(),
        dead_after_secs: 5,
        key_file: "volume.key".into(),
        orphan_grace_secs: 3600,
        lock_grace_secs: 15,
        rebalance_threshold_mib: 1024,
        metrics_listen: Some(free_tcp_port(meta.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h))?),
        tls: tls("meta"),
    };
    cairn_config::save(&dir.join("meta.toml"), "Cairn metadata server", &meta_file)?;
    let client = ClientFile {
        timeout_secs: 10,
        cache_mib: 64,
        write_buffer_mib: 64,
        disk_cache_mib: 0,
        disk_cache_dir: None,
        tls: tls("client"),
    };
    cairn_config::save(&dir.join("client.toml"), "Cairn client (mount.cairn -o config=...)", &client)?;
    let uuid = format!("{:032x}", rand::random::<u128>());
    let info = cairn_proto::VolumeInfo {
        name: args.volume.volume.clone(),
        uuid,
        chunk_size: 64 << 20,
        block_size: 1 << 20,
        replication: args.volume.replication.max(1),
        compression: args.volume.compression,
        encrypted: !args.volume.no_encryption,
    };
    let db = dir.join("meta.db");
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
        let store = cairn_meta::Store::open(&db).await?;
        store.format(&info, 0, 0).await
    })?;
    let mut cluster = ClusterFile {
        volume: args.volume.volume.clone(),
        meta,
        chunk_servers: Vec::new(),
        chunk_host: args.chunk_host.clone(),
        chunk_zone: args.chunk_zone.clone(),
    };
    cairn_config::save(&dir.join("cluster.toml"), "Cairn volume directory", &cluster)?;
    for id in 1..=u64::from(args.chunk_servers) {
        add_chunk_server(dir, &mut cluster, id)?;
    }
    println!("formatted volume {:?} in {} (mount source {})", args.volume, dir.display(), cluster.source());
    Ok(cluster)
}
