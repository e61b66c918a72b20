//! Test harness: starts a real local cluster (`cairn local up`) in a temporary directory and
//! tears it down (unmount, stop every process it started) when dropped, even after a panic.
//!
//! The binaries must be built first (`cargo build --workspace`); they are looked up next to
//! the test executable's target directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Directory holding the workspace's binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
    for b in ["cairn", "cairn-mount"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: run `cargo build --workspace` before the tests",
            dir.join(b).display()
        );
    }
    dir
}

/// Held by tests that drop the machine's caches (`/proc/sys/vm/drop_caches`) and by tests that
/// count requests which such a drop would change (a read with a few pages gone from the
/// page cache would read ahead; a walk would look names up again). The tests of one binary
/// run in parallel threads; binaries run one after another.
pub fn page_cache_to_myself() -> std::sync::MutexGuard<'static, ()> {
    static PAGE_CACHE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    PAGE_CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Path of a workspace binary.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Runs a command and panics with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a shell command line in `dir` and panics if it fails.
pub fn sh(dir: &Path, script: &str) -> String {
    run(Command::new("bash").arg("-euo").arg("pipefail").arg("-c").arg(script).current_dir(dir))
}

/// A local cluster with one mount, torn down on drop.
pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub data: PathBuf,
    pub mnt: PathBuf,
    extra_mounts: std::cell::RefCell<Vec<PathBuf>>,
}

impl Cluster {
    /// Formats and starts a cluster with `chunk_servers` chunk servers and mounts it.
    pub fn start(chunk_servers: u32) -> Cluster {
        Self::start_with(chunk_servers, &[])
    }

    /// Like [`Cluster::start`] with extra `cairn local up` arguments.
    pub fn start_with(chunk_servers: u32, extra: &[&str]) -> Cluster {
        let tmp = tempfile::Builder::new().prefix("cairn-test-").tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let mnt = tmp.path().join("mnt");
        let c = Cluster { data, mnt, tmp, extra_mounts: Default::default() };
        c.up(chunk_servers, extra);
        c
    }

    /// Runs `cairn local up` again (after `down` or a crash) on the same data.
    pub fn up(&self, chunk_servers: u32, extra: &[&str]) {
        run(Command::new(bin("cairn"))
            .args(["local", "up"])
            .arg(&self.mnt)
            .arg("--data")
            .arg(&self.data)
            .args(["--chunk-servers", &chunk_servers.to_string()])
            .args(extra));
    }

    /// Prints the end of every server and mount log: a failed test shows them in its output
    /// (CI keeps nothing else of a cluster).
    fn print_log_tails(&self) {
        let Ok(dir) = std::fs::read_dir(self.data.join("logs")) else { return };
        for log in dir.flatten() {
            let text = std::fs::read_to_string(log.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("---- last lines of {} ----", log.path().display());
            lines[lines.len().saturating_sub(40)..].iter().for_each(|l| eprintln!("{l}"));
        }
    }

    /// Runs `cairn local down`.
    pub fn down(&self) {
        run(Command::new(bin("cairn")).args(["local", "down"]).arg(&self.mnt).arg("--data").arg(&self.data));
    }

    /// A path inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The mount SOURCE as shown in /proc/mounts.
    pub fn source(&self) -> String {
        mount_source(&self.mnt).expect("cluster is mounted")
    }

    /// Mounts the same volume a second time with the helper, as a separate client process.
    pub fn mount_again(&self, name: &str, opts: &str) -> PathBuf {
        let dir = self.tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut o = format!("log={}", self.data.join(format!("logs/{name}.log")).display());
        if !opts.is_empty() {
            o = format!("{o},{opts}");
        }
        run(Command::new(bin("cairn-mount")).arg(self.source()).arg(&dir).arg("-o").arg(o));
        self.extra_mounts.borrow_mut().push(dir.clone());
        dir
    }

    /// [`Cluster::mount_again`], and the pid of that mount's process (to stop or kill it).
    pub fn mount_again_with_pid(&self, name: &str) -> (PathBuf, i32) {
        let pidfile = self.tmp.path().join(format!("{name}.pid"));
        let dir = self.mount_again(name, &format!("pidfile={}", pidfile.display()));
        let pid = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        (dir, pid)
    }

    /// Pid of a server process started by `cairn local up` (`meta`, `chunk-1`, `mount`, …).
    pub fn pid(&self, name: &str) -> i32 {
        let p = self.data.join("run").join(format!("{name}.pid"));
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).trim().parse().unwrap()
    }

    /// SIGKILLs a process started by the cluster and waits until it is gone.
    pub fn kill9(&self, name: &str) {
        kill9(self.pid(name));
    }

    /// Runs `cairn ARGS --data <this volume>` and returns its output; panics if it fails.
    pub fn cairn(&self, args: &[&str]) -> String {
        run(Command::new(bin("cairn")).args(args).arg("--data").arg(&self.data))
    }

    /// `cairn status`.
    pub fn status(&self) -> String {
        self.cairn(&["status"])
    }

    /// Polls `cairn status` until `done` holds, for at most `limit`; returns that status.
    pub fn wait_status(&self, what: &str, limit: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.status();
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "waited {limit:?} for {what}; status:\n{s}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Sets top-level `key = value` (value in TOML syntax) in one of the volume's config files
    /// (`meta.toml`, `chunk-1.toml`, …); takes effect when that server next starts.
    pub fn set_config(&self, file: &str, key: &str, value: &str) {
        let path = self.data.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut done = false;
        let lines: Vec<String> = text
            .lines()
            .map(|l| match l.split_once('=') {
                Some((k, _)) if k.trim() == key && !done => {
                    done = true;
                    format!("{key} = {value}")
                }
                _ => l.to_string(),
            })
            .collect();
        assert!(done, "no {key} in {}", path.display());
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    }
}

/// The number just before `label` on the `cairn status` line starting with `line`.
pub fn status_count(status: &str, line: &str, label: &str) -> u64 {
    let l = status.lines().find(|l| l.starts_with(line)).unwrap_or_else(|| panic!("no {line:?} line in {status}"));
    let before = &l[..l.find(label).unwrap_or_else(|| panic!("{label:?} in {l:?}"))];
    before.split_whitespace().last().unwrap().parse().unwrap()
}

/// The sum of the `cairn stats` counters of the mount at `mnt` whose names (e.g.
/// `meta.Lookup`) `counted` accepts.
pub fn request_count(mnt: &Path, counted: impl Fn(&str) -> bool) -> u64 {
    let stats = run(Command::new(bin("cairn")).arg("stats").arg(mnt));
    stats
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| counted(name))
        .map(|(_, n)| n.trim().parse::<u64>().unwrap())
        .sum()
}

/// The string value of `key = "..."` in a TOML file written by `cairn format`.
pub fn toml_value(file: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
        })
        .unwrap_or_else(|| panic!("no {key} in {}", file.display()))
}

/// SIGKILLs a process and waits for it to disappear.
pub fn kill9(pid: i32) {
    // SAFETY: kill(2) on a pid this test's cluster started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exited(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` has ended: gone, or a zombie its parent has not reaped yet.
pub fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// The SOURCE of whatever is mounted at `dir`.
pub fn mount_source(dir: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let want = dir.to_string_lossy().replace(' ', "\\040");
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (src, dst) = (f.next()?, f.next()?);
            (dst == want).then(|| src.to_string())
        })
        .next_back()
}

/// One block as a chunk server stores it: `name` is `<slice as hex>-<index>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StoredBlock {
    pub name: String,
    pub at: BlockAt,
}

/// Where a block's bytes are.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum BlockAt {
    /// A file, `blocks/<bucket>/<name>`.
    File(PathBuf),
    /// A row of the small block database, `blocks/small.db`.
    Row { db: PathBuf, slice: i64, index: i64 },
}

impl StoredBlock {
    /// The block's bytes as stored.
    pub fn read(&self) -> Vec<u8> {
        match &self.at {
            BlockAt::File(path) => std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
            BlockAt::Row { db, slice, index } => open_db(db)
                .query_row("SELECT data FROM blocks WHERE slice = ?1 AND idx = ?2", [slice, index], |r| r.get(0))
                .unwrap_or_else(|e| panic!("{}: {e}", self.name)),
        }
    }

    /// Replaces the block's bytes behind the chunk server's back, as a failing disk would.
    pub fn overwrite(&self, bytes: &[u8]) {
        match &self.at {
            BlockAt::File(path) => std::fs::write(path, bytes).unwrap(),
            BlockAt::Row { db, slice, index } => {
                let n = open_db(db)
                    .execute(
                        "UPDATE blocks SET data = ?3 WHERE slice = ?1 AND idx = ?2",
                        rusqlite::params![slice, index, bytes],
                    )
                    .unwrap();
                assert_eq!(n, 1, "{} vanished", self.name);
            }
        }
    }
}

fn open_db(db: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(db).unwrap_or_else(|e| panic!("{}: {e}", db.display()));
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}

/// The blocks a chunk server with data directory `chunk_dir` stores, sorted: the rows of its
/// small block database and its block files (`blocks/<bucket>/<slice>-<index>`), without
/// in-progress (`.tmp-`) files and the pool of emptied files kept for reuse (`blocks/spare`).
pub fn stored_blocks_of(chunk_dir: &Path) -> Vec<StoredBlock> {
    let mut out = Vec::new();
    let db = chunk_dir.join("blocks/small.db");
    if db.exists() {
        let c = open_db(&db);
        let mut q = c.prepare("SELECT slice, idx FROM blocks").unwrap();
        let rows = q.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))).unwrap();
        for (slice, index) in rows.map(Result::unwrap) {
            let name = format!("{:016x}-{index}", slice as u64);
            out.push(StoredBlock { name, at: BlockAt::Row { db: db.clone(), slice, index } });
        }
    }
    let Ok(buckets) = std::fs::read_dir(chunk_dir.join("blocks")) else { return out };
    for bucket in buckets.flatten().filter(|b| b.file_name() != "spare" && b.path().is_dir()) {
        let Ok(files) = std::fs::read_dir(bucket.path()) else { continue };
        for f in files.flatten().filter(|f| !f.file_name().to_string_lossy().starts_with('.')) {
            out.push(StoredBlock { name: f.file_name().to_string_lossy().into_owned(), at: BlockAt::File(f.path()) });
        }
    }
    out.sort();
    out
}

/// Lazily unmounts `dir` if anything is mounted there.
pub fn umount_lazy(dir: &Path) {
    if mount_source(dir).is_some() {
        let _ = Command::new("umount").arg("-l").arg(dir).status();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_log_tails();
        }
        for m in self.extra_mounts.borrow().iter() {
            umount_lazy(m);
        }
        let ok = Command::new(bin("cairn"))
            .args(["local", "down"])
            .arg(&self.mnt)
            .arg("--data")
            .arg(&self.data)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        umount_lazy(&self.mnt);
        if !ok {
            // Last resort: kill what the pid files name, if it still is this cluster's (a
            // number may have gone to another test's process since).
            let ours = |pid: i32| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline).contains(&format!("{}/", self.data.display()))
            };
            if let Ok(dir) = std::fs::read_dir(self.data.join("run")) {
                for e in dir.flatten() {
                    let pid = std::fs::read_to_string(e.path()).ok().and_then(|s| s.trim().parse().ok());
                    if let Some(pid) = pid.filter(|p| ours(*p)) {
                        kill9(pid);
                    }
                }
            }
        }
    }
}

/// errno of the last failed libc call.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Builds a C string from a path.
pub fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL in path")
}

/// `statvfs(2)` of `p`; panics on failure.
pub fn statvfs(p: &Path) -> libc::statvfs {
    // SAFETY: zeroed is a valid statvfs; the call fills it.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    let rc = unsafe { libc::statvfs(cpath(p).as_ptr(), &mut s) };
    assert_eq!(rc, 0, "statvfs {}: {}", p.display(), std::io::Error::last_os_error());
    s
}

/// `len` deterministic pseudo-random bytes (xorshift): data zstd cannot shrink, for tests
/// about how much space file data takes on the chunk servers.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A small tmpfs mounted on a chunk server's data directory, unmounted on drop.
pub struct Tmpfs(pub Option<PathBuf>);

impl Tmpfs {
    pub fn mount(&mut self, dir: &Path, size: &str) {
        run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755")]).arg("tmpfs").arg(dir));
        self.0 = Some(dir.to_path_buf());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = Command::new("umount").arg("-l").arg(&d).status();
        }
    }
}

/// A cluster with a tmpfs under one of its chunk servers; stops the cluster before the tmpfs
/// is unmounted.
pub struct FullDisk {
    pub tmpfs: Tmpfs,
    pub c: Cluster,
}

impl FullDisk {
    /// Starts a cluster (`cairn local up` arguments `extra`), then restarts it with a tmpfs of
    /// `size` as chunk server 1's data directory.
    pub fn start(chunk_servers: u32, extra: &[&str], size: &str) -> FullDisk {
        let mut t = FullDisk { tmpfs: Tmpfs(None), c: Cluster::start_with(chunk_servers, extra) };
        t.c.down();
        let chunk_dir = t.c.data.join(toml_value(&t.c.data.join("chunk-1.toml"), "data_dir"));
        t.tmpfs.mount(&chunk_dir, size);
        t.c.up(chunk_servers, &[]);
        t
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = Command::new(bin("cairn"))
            .args(["local", "down"])
            .arg(&self.c.mnt)
            .arg("--data")
            .arg(&self.c.data)
            .output();
        umount_lazy(&self.c.mnt);
        // Now that nothing uses it, unmount the tmpfs (Tmpfs::drop), before the
        // cluster's temporary directory is removed.
        drop(Tmpfs(self.tmpfs.0.take()));
    }
}
