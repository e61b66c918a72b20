//! Parsing what mount(8), fstab and users pass to `mount.cairn`.

use anyhow::{Context, bail};
use cairn_client::AtimeMode;
use std::path::PathBuf;

/// A parsed `mount.cairn SOURCE DIR -o OPTIONS` command line.
#[derive(Debug, Clone, PartialEq)]
pub struct MountArgs {
    /// Exactly as given; shown as the mount's SOURCE in /proc/mounts.
    pub source: String,
    /// Metadata server addresses (`host:port`), in order of preference.
    pub meta: Vec<String>,
    pub volume: String,
    pub mountpoint: PathBuf,
    pub opts: CairnOptions,
}

/// Options that change how the client behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct CairnOptions {
    /// Client settings file (certificates, timeouts, cache sizes).
    pub config: Option<PathBuf>,
    pub timeout_secs: Option<u64>,
    pub threads: usize,
    pub foreground: bool,
    pub log: Option<PathBuf>,
    /// File to write the client's process id to once mounted.
    pub pidfile: Option<PathBuf>,
    pub read_only: bool,
    pub allow_other: bool,
    pub default_permissions: bool,
    /// Kernel flags passed through (`nodev`, `nosuid`, `noexec`, `noatime`, …).
    pub kernel: Vec<String>,
    /// `-o remount,…`: change the flags of the existing mount instead of mounting.
    pub remount: bool,
    /// When reads update atime; the kernel leaves this to FUSE filesystems.
    pub atime: AtimeMode,
    /// `nodiratime` turns off atime updates by directory listings.
    pub diratime: bool,
    /// `acl`: POSIX ACLs enforced by the kernel. Off by default, as in JuiceFS and ceph-fuse:
    /// the kernel then asks for each file's ACL once (a round trip per file of a cold `ls -l`),
    /// while without them `ls` learns from one `EOPNOTSUPP` that the mount has none.
    pub acl: bool,
}

impl Default for CairnOptions {
    fn default() -> Self {
        CairnOptions {
            config: None,
            timeout_secs: None,
            threads: 4,
            foreground: false,
            log: None,
            pidfile: None,
            read_only: false,
            allow_other: true,
            default_permissions: true,
            kernel: Vec::new(),
            remount: false,
            atime: AtimeMode::default(),
            diratime: true,
            acl: false,
        }
    }
}

/// Splits `host:port[,host:port…]:/volume` into addresses and volume name.
pub fn parse_source(source: &str) -> anyhow::Result<(Vec<String>, String)> {
    let Some((addrs, volume)) = source.rsplit_once(":/") else {
        bail!("source {source:?} is not of the form HOST:PORT:/VOLUME");
    };
    let volume = volume.trim_end_matches('/');
    if volume.is_empty() || volume.contains('/') {
        bail!("source {source:?} names no volume (expected HOST:PORT:/VOLUME)");
    }
    let meta: Vec<String> = addrs.split(',').map(str::to_string).collect();
    for a in &meta {
        if a.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
            bail!("metadata server address {a:?} in {source:?} is not HOST:PORT");
        }
    }
    Ok((meta, volume.to_string()))
}

/// Applies one comma-separated `-o` list.
pub fn apply_options(opts: &mut CairnOptions, list: &str) -> anyhow::Result<()> {
    for opt in list.split(',').filter(|o| !o.is_empty()) {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        match key {
            "config" => {
                opts.config = Some(PathBuf::from(value.with_context(|| format!("mount option {key} needs a value"))?))
            }
            "timeout" => {
                opts.timeout_secs = Some(
                    value
                        .with_context(|| format!("mount option {key} needs a value"))?
                        .parse()
                        .context("timeout= takes seconds")?,
                )
            }
            "threads" => {
                opts.threads = value
                    .with_context(|| format!("mount option {key} needs a value"))?
                    .parse()
                    .context("threads= takes a number")?
            }
            "log" => {
                opts.log = Some(PathBuf::from(value.with_context(|| format!("mount option {key} needs a value"))?))
            }
            "pidfile" => opts.pidfile = Some(PathBuf::from(value.with_context(|| "pidfile= needs a path")?)),
            "foreground" => opts.foreground = true,
            "remount" => opts.remount = true,
            "ro" => opts.read_only = true,
            "rw" => opts.read_only = false,
            "allow_other" => opts.allow_other = true,
            "noallow_other" => opts.allow_other = false,
            "default_permissions" => opts.default_permissions = true,
            "noatime" => {
                opts.atime = AtimeMode::Never;
                opts.kernel.push(key.to_string());
            }
            "atime" | "relatime" | "nostrictatime" => opts.atime = AtimeMode::Relative,
            "strictatime" | "norelatime" => opts.atime = AtimeMode::Always,
            "diratime" => opts.diratime = true,
            "nodiratime" => opts.diratime = false,
            "acl" => opts.acl = true,
            "noacl" => opts.acl = false,
            "dev" | "nodev" | "suid" | "nosuid" | "exec" | "noexec" | "sync" | "async" | "dirsync" => {
                opts.kernel.push(key.to_string())
            }
            // Accepted and ignored: meaningful to mount(8), systemd or fstab, not to the client.
            "defaults" | "_netdev" | "nofail" | "noauto" | "auto" | "user" | "nouser" | "users" | "owner" | "group"
            | "lazytime" | "nolazytime" | "loud" | "silent" => {}
            k if k.starts_with("x-") || k == "comment" => {}
            // What the kernel shows for a live FUSE mount; mount(8) passes them back on remount.
            "user_id" | "group_id" | "rootmode" | "fd" | "blksize" | "max_read" | "subtype" | "fsname" => {}
            _ => bail!("unknown mount option {opt:?} (see `man mount.cairn` in docs/MOUNT.md)"),
        }
    }
    Ok(())
}

/// Parses the helper's arguments (without the program name).
pub fn parse_args(args: &[String]) -> anyhow::Result<MountArgs> {
    let mut positional = Vec::new();
    let mut opts = CairnOptions::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => apply_options(&mut opts, it.next().context("-o needs an option list")?)?,
            s if s.starts_with("-o") => apply_options(&mut opts, &s[2..])?,
            "-f" | "--foreground" => opts.foreground = true,
            // mount(8) may pass these to helpers: no mtab, verbose, sloppy.
            "-n" | "-v" | "-s" => {}
            s if s.starts_with('-') => bail!("unknown argument {s:?}"),
            _ => positional.push(a.clone()),
        }
    }
    let [source, mountpoint] = positional.as_slice() else {
        bail!("usage: mount.cairn HOST:PORT:/VOLUME MOUNTPOINT [-o OPTIONS]");
    };
    let (meta, volume) = parse_source(source)?;
    Ok(MountArgs { source: source.clone(), meta, volume, mountpoint: PathBuf::from(mountpoint), opts })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn fstab_style_options_are_accepted() {
        let a = parse_args(&args(
            "127.0.0.1:7000:/vol /mnt/x -o rw,_netdev,nofail,noauto,defaults,x-systemd.automount,noatime,timeout=5",
        ))
        .unwrap();
        assert_eq!(a.meta, vec!["127.0.0.1:7000"]);
        assert_eq!(a.volume, "vol");
        assert_eq!(a.opts.timeout_secs, Some(5));
        assert_eq!(a.opts.kernel, vec!["noatime"]);
        assert_eq!(a.opts.atime, AtimeMode::Never);
        let s = parse_args(&args("h:1:/v /m -o strictatime")).unwrap();
        assert_eq!(s.opts.atime, AtimeMode::Always);
        assert_eq!(parse_args(&args("h:1:/v /m")).unwrap().opts.atime, AtimeMode::Relative);
        assert!(a.opts.allow_other && a.opts.default_permissions);
    }

    #[test]
    fn bad_input_is_refused_clearly() {
        assert!(parse_args(&args("127.0.0.1:7000/vol /mnt")).is_err());
        assert!(parse_args(&args("127.0.0.1:x:/vol /mnt")).is_err());
        assert!(parse_args(&args("127.0.0.1:7000:/ /mnt")).is_err());
        assert!(parse_args(&args("127.0.0.1:7000:/vol /mnt -o bogus")).is_err());
        assert!(parse_args(&args("127.0.0.1:7000:/vol")).is_err());
        let r = parse_args(&args("127.0.0.1:7000:/vol /mnt -o remount,ro,nodiratime,user_id=0,group_id=0")).unwrap();
        assert!(r.opts.remount && r.opts.read_only && !r.opts.diratime);
        let (m, v) = parse_source("a:1,b:2:/v").unwrap();
        assert_eq!((m, v.as_str()), (vec!["a:1".to_string(), "b:2".to_string()], "v"));
    }
}
