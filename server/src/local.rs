//! `cairn local up|down`: an all-in-one cluster on 127.0.0.1, as separate processes.

use crate::format::{self, ClusterFile, FormatArgs, VolumeArgs};
use anyhow::{Context, bail};
use cairn_client::{Client, ClientConfig};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where `cairn local up` keeps the volume unless `--data` says otherwise.
pub const DEFAULT_DATA: &str = "/var/lib/cairn/local";
/// Where a running local cluster registers its client settings for mount.cairn.
const RUN_DIR: &str = "/run/cairn/clusters";
/// In a local cluster's data directory: the mountpoint its last `up` mounted.
const MOUNTPOINT_FILE: &str = "run/mountpoint";
/// How long `up` waits for servers and the mount.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Subcommand, Debug)]
pub enum LocalCommand {
    /// Format on first use, start the metadata server and chunk servers, and mount.
    Up {
        mountpoint: PathBuf,
        /// Volume directory (created and formatted on first use).
        #[arg(long, default_value = DEFAULT_DATA)]
        data: PathBuf,
        /// Number of chunk servers to run.
        #[arg(long, default_value_t = 3)]
        chunk_servers: u32,
        /// Give each chunk server its own failure domain, as if each ran on its own machine,
        /// so blocks get as many copies as the replication factor asks (to try replication
        /// on one machine). By default they share the zone `local`, as they share one disk,
        /// and blocks get one copy. Used when formatting, ignored afterwards.
        #[arg(long)]
        separate_zones: bool,
        /// Used when formatting, ignored afterwards.
        #[command(flatten)]
        volume: VolumeArgs,
        /// Extra mount options passed to mount.cairn.
        #[arg(short = 'o', long)]
        options: Option<String>,
    },
    /// Unmount and stop the servers started by `up`.
    Down {
        mountpoint: PathBuf,
        /// Volume directory (default: found from the mount, else the default directory).
        #[arg(long)]
        data: Option<PathBuf>,
    },
}

/// How a server says that its port is taken (strerror of EADDRINUSE, in its last words).
const PORT_TAKEN: &str = "Address already in use";
/// How many times `up` moves chunk servers whose ports were taken before giving up.
const MAX_PORT_MOVES: u32 = 3;

/// The one failure domain of a local cluster's chunk servers (they share a disk).
const LOCAL_ZONE: &str = "local";

pub fn run(cmd: LocalCommand) -> anyhow::Result<()> {
    match cmd {
        LocalCommand::Up { mountpoint, data, chunk_servers, separate_zones, volume, options } => {
            up(&mountpoint, &data, chunk_servers, separate_zones, &volume, options.as_deref())
        }
        LocalCommand::Down { mountpoint, data } => down(&mountpoint, data),
    }
}

/// Connects to a local cluster's metadata server with its client settings.
pub async fn connect(data: &Path, cluster: &ClusterFile, timeout: Duration) -> anyhow::Result<Arc<Client>> {
    let file: cairn_config::ClientFile = cairn_config::load(&data.join("client.toml"))?;
    let identity = cairn_net::Identity::load(&file.tls.ca, &file.tls.cert, &file.tls.key)?;
    let config = ClientConfig {
        meta: cluster.meta.clone(),
        volume: cluster.volume.clone(),
        timeout,
        atime: cairn_client::AtimeMode::Never,
        ..ClientConfig::default()
    };
    Ok(Client::connect(config, &identity).await?)
}

fn registration(cluster: &ClusterFile) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{}.toml", cluster.meta.replace([':', '/'], "_")))
}

fn up(
    mountpoint: &Path,
    data: &Path,
    chunk_servers: u32,
    separate_zones: bool,
    volume: &VolumeArgs,
    options: Option<&str>,
) -> anyhow::Result<()> {
    let mountpoint = match std::fs::create_dir_all(mountpoint).and_then(|()| mountpoint.canonicalize()) {
        Ok(p) => p,
        // A live mount whose servers are down cannot be stat'ed; `up` is what brings them back.
        Err(e) => match std::path::absolute(mountpoint) {
            Ok(p) if mounted_source(&p).is_some() => p,
            _ => return Err(e).with_context(|| format!("creating {}", mountpoint.display())),
        },
    };
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let data = data.canonicalize()?;
    if !data.join("cluster.toml").exists() {
        format::run(&FormatArgs {
            data: data.clone(),
            volume: volume.clone(),
            meta_listen: "127.0.0.1:0".into(),
            chunk_servers,
            chunk_host: "127.0.0.1".into(),
            chunk_zone: (!separate_zones).then(|| LOCAL_ZONE.to_string()),
        })?;
    }
    let mut cluster: ClusterFile = cairn_config::load(&data.join("cluster.toml"))?;
    while cluster.chunk_servers.len() < chunk_servers as usize {
        let id = cluster.chunk_servers.iter().max().copied().unwrap_or(0) + 1;
        format::add_chunk_server(&data, &mut cluster, id)?;
    }
    std::fs::create_dir_all(data.join("run"))?;
    std::fs::create_dir_all(data.join("logs"))?;
    let exe = std::env::current_exe()?;
    start(&data, "meta", &exe, &["meta", "--config", &data.join("meta.toml").to_string_lossy()])?;
    let rt = crate::runtime()?;
    let meta = ["meta".to_string()];
    let client = rt.block_on(wait_for(
        START_TIMEOUT,
        "the metadata server",
        || exited(&data, &meta).map(|e| e.to_string()),
        || connect(&data, &cluster, Duration::from_secs(3)),
    ))?;
    let ids: Vec<u64> = cluster.chunk_servers.iter().take(chunk_servers as usize).copied().collect();
    let start_chunk = |id: u64| {
        let config = data.join(format!("chunk-{id}.toml"));
        start(&data, &format!("chunk-{id}"), &exe, &["chunk", "--config", &config.to_string_lossy()])
    };
    for id in &ids {
        start_chunk(*id)?;
    }
    let chunks: Vec<String> = ids.iter().map(|id| format!("chunk-{id}")).collect();
    // A port picked free may be taken by another program before its server binds it: such
    // a chunk server moves to new ports (it tells the metadata server where it is).
    let moves = std::cell::Cell::new(0);
    let chunk_died = || {
        let exit = exited(&data, &chunks)?;
        let id = ids[chunks.iter().position(|n| *n == exit.name)?];
        if !exit.last.contains(PORT_TAKEN) || moves.get() >= MAX_PORT_MOVES {
            return Some(exit.to_string());
        }
        moves.set(moves.get() + 1);
        match format::move_chunk_server(&data, id).and_then(|()| start_chunk(id)) {
            Ok(()) => {
                eprintln!("{}: its port was taken; started it again on another", exit.name);
                None
            }
            Err(e) => Some(format!("{exit}; moving it to other ports: {e:#}")),
        }
    };
    rt.block_on(wait_for(START_TIMEOUT, "the chunk servers", chunk_died, || async {
        let alive = client.list_servers().await?.iter().filter(|s| s.alive).count();
        if alive < chunk_servers as usize {
            bail!("{alive} of {chunk_servers} chunk servers registered");
        }
        Ok(())
    }))?;
    // Gone before the mount connects, which is then the volume's only client (solo lease).
    rt.block_on(client.disconnect());
    drop(client);
    let reg = registration(&cluster);
    std::fs::create_dir_all(RUN_DIR)?;
    let _ = std::fs::remove_file(&reg);
    std::os::unix::fs::symlink(data.join("client.toml"), &reg)
        .with_context(|| format!("registering {}", reg.display()))?;
    // So that `down` finds this cluster by its mountpoint also once that is unmounted.
    std::fs::write(data.join(MOUNTPOINT_FILE), mountpoint.as_os_str().as_encoded_bytes())?;
    let source = cluster.source();
    if mounted_source(&mountpoint).as_deref() == Some(source.as_str()) {
        println!("{source} is already mounted on {}", mountpoint.display());
        return Ok(());
    }
    let helper = mount_helper(&exe)?;
    let mut opts =
        format!("log={},pidfile={}", data.join("logs/mount.log").display(), data.join("run/mount.pid").display());
    if let Some(extra) = options {
        opts.push(',');
        opts.push_str(extra);
    }
    let status = Command::new(&helper)
        .arg(&source)
        .arg(&mountpoint)
        .arg("-o")
        .arg(&opts)
        .status()
        .with_context(|| format!("running {}", helper.display()))?;
    if !status.success() {
        bail!("mounting {source} on {} failed ({status})", mountpoint.display());
    }
    println!("Cairn volume {source} is mounted on {} (data in {})", mountpoint.display(), data.display());
    Ok(())
}

/// Retries `f` until it succeeds or `limit` passes; fails at once if `dead` names a process
/// that exited meanwhile.
async fn wait_for<T, F, Fut>(
    limit: Duration,
    what: &str,
    dead: impl Fn() -> Option<String>,
    mut f: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(why) = dead() {
            bail!("waiting for {what}: {why}");
        }
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > limit => {
                return Err(e.context(format!("waiting for {what}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The mount helper: `cairn-mount` beside this binary, else `mount.cairn` on the PATH.
fn mount_helper(exe: &Path) -> anyhow::Result<PathBuf> {
    let dir = exe.parent().context("locating this program's directory")?;
    for name in ["cairn-mount", "mount.cairn"] {
        let p = dir.join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    for p in ["/usr/sbin/mount.cairn", "/sbin/mount.cairn"] {
        if Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    bail!("cannot find the mount helper (cairn-mount) next to {}", exe.display())
}

/// The SOURCE of the mount at `mountpoint`, if one is there.
fn mounted_source(mountpoint: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let want = mountpoint.to_string_lossy().replace(' ', "\\040");
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (src, dst) = (f.next()?, f.next()?);
            (dst == want).then(|| src.to_string())
        })
        .next_back()
}

fn pid_path(data: &Path, name: &str) -> PathBuf {
    data.join("run").join(format!("{name}.pid"))
}

/// The process id recorded in `name`'s pid file.
fn recorded_pid(data: &Path, name: &str) -> Option<i32> {
    std::fs::read_to_string(pid_path(data, name)).ok()?.trim().parse().ok()
}

/// The process recorded in a pid file, if it still runs a cairn program of this volume
/// directory (its configuration or log is under `data`): the number of one that exited may
/// belong to any process by now, another cluster's server too, which must not be taken for
/// this one's nor stopped.
fn running_pid(data: &Path, name: &str) -> Option<i32> {
    let pid = recorded_pid(data, name)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    let dir = format!("{}/", data.display());
    (cmdline.contains("cairn") && cmdline.contains(&dir)).then_some(pid)
}

/// A server started here that exited.
struct Exit {
    name: String,
    /// The last line of its log: why, as it said.
    last: String,
    log: PathBuf,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} exited: {} (log: {})", self.name, self.last, self.log.display())
    }
}

/// The first of `names` started here whose process has exited.
fn exited(data: &Path, names: &[String]) -> Option<Exit> {
    // Zombie or gone, not "its command line lacks cairn": that is also true for a moment
    // while the new process runs exec.
    let name = names.iter().find(|n| recorded_pid(data, n).is_some_and(is_zombie))?;
    let log = data.join("logs").join(format!("{name}.log"));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
    Some(Exit { name: name.clone(), last, log })
}

/// Starts `exe args` in its own session with output to `logs/<name>.log`, unless running.
fn start(data: &Path, name: &str, exe: &Path, args: &[&str]) -> anyhow::Result<()> {
    if running_pid(data, name).is_some() {
        return Ok(());
    }
    let log_path = data.join("logs").join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    std::fs::write(pid_path(data, name), format!("{}\n", child.id()))?;
    Ok(())
}

/// Sends SIGTERM, waits, then SIGKILL; returns once the process is gone.
fn stop(data: &Path, name: &str) {
    let Some(pid) = running_pid(data, name) else {
        return;
    };
    // SAFETY: plain kill(2) on a pid we started (checked through /proc).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        if is_zombie(pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = std::fs::remove_file(pid_path(data, name));
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

fn down(mountpoint: &Path, data: Option<PathBuf>) -> anyhow::Result<()> {
    let mountpoint = mountpoint.canonicalize().unwrap_or_else(|_| mountpoint.to_path_buf());
    let data = match data {
        // As `up` named it to the servers it started (see `running_pid`).
        Some(d) => d.canonicalize().unwrap_or(d),
        None => data_of_mount(&mountpoint)
            .or_else(|| data_started_for(&mountpoint))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA)),
    };
    if !data.join("cluster.toml").exists() {
        bail!(
            "no local cluster found for {}: it is not mounted by one, none running was started for it, \
             and {} holds none (pass --data DIR)",
            mountpoint.display(),
            data.display()
        );
    }
    if mounted_source(&mountpoint).is_some() {
        let path = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())?;
        // SAFETY: valid NUL-terminated path.
        if unsafe { libc::umount2(path.as_ptr(), 0) } != 0 {
            let err = std::io::Error::last_os_error();
            eprintln!("cairn: unmounting {}: {err}; detaching it instead", mountpoint.display());
            // SAFETY: as above.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
    stop(&data, "mount");
    let cluster: Option<ClusterFile> = cairn_config::load(&data.join("cluster.toml")).ok();
    if let Some(c) = &cluster {
        for id in &c.chunk_servers {
            stop(&data, &format!("chunk-{id}"));
        }
        let _ = std::fs::remove_file(registration(c));
    }
    stop(&data, "meta");
    println!("stopped the local cluster in {}", data.display());
    Ok(())
}

/// The volume directory of a running local cluster whose `up` mounted `mountpoint` (found
/// through the registrations of running clusters), for a `down` after the mount went away.
fn data_started_for(mountpoint: &Path) -> Option<PathBuf> {
    std::fs::read_dir(RUN_DIR).ok()?.flatten().find_map(|reg| {
        let data = std::fs::read_link(reg.path()).ok()?.parent()?.to_path_buf();
        let started_for = std::fs::read(data.join(MOUNTPOINT_FILE)).ok()?;
        (started_for == mountpoint.as_os_str().as_encoded_bytes()).then_some(data)
    })
}

/// The volume directory of a mounted local cluster, through its registration symlink.
fn data_of_mount(mountpoint: &Path) -> Option<PathBuf> {
    let source = mounted_source(mountpoint)?;
    let (addr, _) = source.rsplit_once(":/")?;
    let reg = Path::new(RUN_DIR).join(format!("{}.toml", addr.replace([':', '/'], "_")));
    Some(std::fs::read_link(reg).ok()?.parent()?.to_path_buf())
}
