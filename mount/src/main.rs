//! `mount.cairn SOURCE MOUNTPOINT [-o OPTIONS]`: mounts a Cairn volume through FUSE.
//!
//! Called by mount(8) for `mount -t cairn`, by fstab and systemd, or directly. It goes to the
//! background and returns once the mount is live; `umount MOUNTPOINT` ends it.

mod daemon;
mod fs;
mod ioctl;
mod options;

use anyhow::Context;
use cairn_client::{AtimeMode, Client, ClientConfig};
use cairn_config::ClientFile;
use options::MountArgs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// Where `cairn local up` and administrators register client settings per cluster.
const RUN_DIR: &str = "/run/cairn/clusters";
const ETC_CLIENT: &str = "/etc/cairn/client.toml";
/// How long an unmounted client waits for its buffered writes to be committed before it ends.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(60);

fn main() {
    // Few malloc arenas: with one per thread, freed multi-MiB block buffers pile up per
    // arena and the client's resident memory grows far past its configured buffers.
    // SAFETY: mallopt is called before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match options::parse_args(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mount.cairn: {e:#}");
            std::process::exit(1);
        }
    };
    if parsed.opts.remount {
        std::process::exit(remount(&parsed));
    }
    if !parsed.opts.foreground {
        let log = parsed.opts.log.clone().unwrap_or_else(|| PathBuf::from("/var/log/cairn/mount.log"));
        match daemon::spawn_background(&log) {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("mount.cairn: {e:#}");
                std::process::exit(1);
            }
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG").unwrap_or_else(|_| "info,fuser=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let pipe = daemon::ready_pipe();
    if let Err(e) = run(parsed, pipe) {
        error!("{e:#}");
        eprintln!("mount.cairn: {e:#}");
        std::process::exit(1);
    }
}

/// The client settings file for this mount: `-o config=`, then the cluster's registration
/// under /run/cairn/clusters, then /etc/cairn/client.toml.
fn find_client_file(args: &MountArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.opts.config {
        return Ok(p.clone());
    }
    for addr in &args.meta {
        let p = Path::new(RUN_DIR).join(format!("{}.toml", addr.replace([':', '/'], "_")));
        if p.exists() {
            return Ok(p);
        }
    }
    if Path::new(ETC_CLIENT).exists() {
        return Ok(PathBuf::from(ETC_CLIENT));
    }
    anyhow::bail!(
        "no client settings for {}: pass -o config=FILE, or create {ETC_CLIENT} (see docs/CONFIG.md)",
        args.source
    )
}

fn run(args: MountArgs, pipe: Option<std::fs::File>) -> anyhow::Result<()> {
    let mut pipe = pipe;
    let mounted = mount(&args);
    let (mut session, client, rt) = match mounted {
        Ok(m) => {
            daemon::report(pipe.take(), &Ok(()));
            m
        }
        Err(e) => {
            daemon::report(pipe.take(), &Err(anyhow::anyhow!("{e:#}")));
            return Err(e);
        }
    };
    info!(source = %args.source, mountpoint = %args.mountpoint.display(), "mounted");

    let guard = std::mem::replace(&mut session.guard, std::thread::spawn(|| Ok(())));
    let ended = guard.join().map_err(|_| anyhow::anyhow!("the FUSE session thread panicked"))?;
    match &ended {
        // Dropping the session unmounts what the failed loop may have left mounted.
        Err(_) => drop(session),
        // The kernel ended the session, so the mount is gone. Dropping the session would
        // unmount the path once more, and by then it may hold a new mount of the same volume
        // (a remount is umount followed at once by mount): keep it from doing so.
        Ok(()) => {
            std::mem::forget(session);
            info!(mountpoint = %args.mountpoint.display(), "unmounted");
        }
    }
    // Whichever way the session ended, what this client still holds reaches the servers:
    // access times gathered for a moment, writes closed just before the unmount (write-behind)
    // and namespace changes answered here (see cairn-client's `deferred`). With the servers
    // away, the writes are given up after a bound rather than holding the exit.
    rt.block_on(client.send_atimes());
    if rt.block_on(async { tokio::time::timeout(FLUSH_AT_EXIT, client.flush_all()).await }).is_err() {
        warn!("writes still buffered at unmount were not committed within {FLUSH_AT_EXIT:?}: they are lost");
    }
    // Tell the metadata server now, so it stops counting this client among lease holders.
    rt.block_on(client.disconnect());
    ended.map_err(|e| anyhow::Error::from(e).context("FUSE session"))
}

/// Mounts; returns the FUSE session, the client and a handle on the runtime that drives it.
fn mount(args: &MountArgs) -> anyhow::Result<(fuser::BackgroundSession, Arc<Client>, tokio::runtime::Handle)> {
    let file_path = find_client_file(args)?;
    let file: ClientFile = cairn_config::load(&file_path)?;
    let identity = cairn_net::Identity::load(&file.tls.ca, &file.tls.cert, &file.tls.key)?;
    let timeout = Duration::from_secs(args.opts.timeout_secs.unwrap_or(file.timeout_secs).max(1));
    let config = ClientConfig {
        meta: args.meta[0].clone(),
        volume: args.volume.clone(),
        timeout,
        cache_bytes: file.cache_mib << 20,
        write_buffer_bytes: file.write_buffer_mib << 20,
        disk_cache: match (file.disk_cache_mib, &file.disk_cache_dir) {
            (0, _) => None,
            (mib, Some(dir)) => Some((dir.clone(), mib << 20)),
            (_, None) => anyhow::bail!("{}: disk_cache_mib needs disk_cache_dir", file_path.display()),
        },
        atime: if args.opts.read_only { AtimeMode::Never } else { args.opts.atime },
        diratime: args.opts.diratime,
        defer_namespace: !args.opts.kernel.iter().any(|k| k == "sync" || k == "dirsync"),
        ..ClientConfig::default()
    };
    // All network work runs on one thread: a request then wakes no other thread between the
    // FUSE thread that hands it over and the answer, which cut each metadata round trip by
    // about a third against a multi-threaded runtime on 2 cores.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = rt
        .block_on(Client::connect(config, &identity))
        .with_context(|| format!("cannot reach volume {} at {}", args.volume, args.meta[0]))?;
    let handle = rt.handle().clone();
    // The runtime must outlive the session: its thread drives it for the life of the process.
    std::thread::Builder::new().name("cairn-io".into()).spawn(move || rt.block_on(std::future::pending::<()>()))?;
    let mut fuse_config = fuser::Config::default();
    fuse_config.mount_options = mount_options(args);
    if args.opts.allow_other {
        fuse_config.acl = fuser::SessionACL::All;
    }
    fuse_config.n_threads = Some(args.opts.threads.max(1));
    fuse_config.clone_fd = true;
    let (fs, notifier) = fs::CairnFs::new(client.clone(), handle.clone(), args.opts.acl);
    let session = fuser::spawn_mount(fs, &args.mountpoint, &fuse_config)
        .with_context(|| format!("mounting on {}", args.mountpoint.display()))?;
    let _ = notifier.set(session.notifier());
    client.set_kernel_invalidator(fs::kernel_invalidator(session.notifier()));
    // Confirm the mount answers before reporting success.
    std::fs::metadata(&args.mountpoint).with_context(|| format!("checking {}", args.mountpoint.display()))?;
    if let Some(p) = &args.opts.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id())).with_context(|| format!("writing {}", p.display()))?;
    }
    install_signal_handlers(&handle, args.mountpoint.clone());
    Ok((session, client, handle))
}

/// `mount -o remount,…` of a Cairn mount: the kernel changes the flags of the live mount
/// (`-i` keeps mount(8) from calling this helper again); the client keeps running.
fn remount(args: &MountArgs) -> i32 {
    let mut flags = vec!["remount".to_string(), if args.opts.read_only { "ro" } else { "rw" }.to_string()];
    flags.extend(args.opts.kernel.iter().cloned());
    let status =
        std::process::Command::new("mount").args(["-i", "-o", &flags.join(",")]).arg(&args.mountpoint).status();
    match status {
        Ok(s) => s.code().unwrap_or(1),
        Err(e) => {
            eprintln!("mount.cairn: running mount -i -o remount: {e}");
            1
        }
    }
}

fn mount_options(args: &MountArgs) -> Vec<fuser::MountOption> {
    use fuser::MountOption as M;
    // The subtype makes the type `fuse.cairn`, so mount(8) hands `-o remount` to this helper
    // (fuser's own Subtype option only reaches fusermount, not the kernel).
    let mut v = vec![M::FSName(args.source.clone()), M::CUSTOM("subtype=cairn".into())];
    if args.opts.default_permissions {
        v.push(M::DefaultPermissions);
    }
    v.push(if args.opts.read_only { M::RO } else { M::RW });
    // mount(8) drops `dev` and `suid` from what it passes to helpers: they are its defaults
    // for mounts by root. FUSE's default is the opposite, so a root mount asks for them
    // unless `nodev` / `nosuid` was given (as ext4 or NFS would behave).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let given = |k: &str| args.opts.kernel.iter().any(|o| o == k);
        if !given("nodev") {
            v.push(M::Dev);
        }
        if !given("nosuid") {
            v.push(M::Suid);
        }
    }
    for k in &args.opts.kernel {
        v.push(match k.as_str() {
            "dev" => M::Dev,
            "nodev" => M::NoDev,
            "suid" => M::Suid,
            "nosuid" => M::NoSuid,
            "exec" => M::Exec,
            "noexec" => M::NoExec,
            "noatime" => M::NoAtime,
            "sync" => M::Sync,
            "async" => M::Async,
            "dirsync" => M::DirSync,
            other => M::CUSTOM(other.to_string()),
        });
    }
    v
}

/// SIGTERM or SIGINT unmounts (lazily, so busy mounts do not block shutdown).
fn install_signal_handlers(rt: &tokio::runtime::Handle, mountpoint: PathBuf) {
    rt.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        info!("signal received, unmounting");
        if let Ok(path) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) {
            // SAFETY: `path` is a valid NUL-terminated path.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    });
}
