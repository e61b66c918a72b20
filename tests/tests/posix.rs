//! POSIX semantics through std and libc calls on a real mount, with the exact errno values
//! Linux gives.
//!
//! Most scenarios run twice: first on a fresh directory of the local filesystem under the
//! system temp directory (the reference: this is what Linux does, so the expectations are
//! proven right on every run), then on a fresh directory in the Cairn mount. Checks only
//! Cairn can answer (capacity, inode counts, 64 KiB xattr values) run on the mount alone.
//! Each test starts its own cluster; the tests must run as root (like the rest of the suite).

use cairn_tests::*;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Runs `scenario` on a fresh local directory (the reference) and then on a fresh directory
/// `name` in the mount. Output names which run failed.
fn on_both(c: &Cluster, name: &str, scenario: impl Fn(&Path)) {
    let reference = tempfile::Builder::new().prefix("cairn-ref-").tempdir().expect("reference tempdir");
    eprintln!("--- {name}: reference run in {}", reference.path().display());
    scenario(reference.path());
    let dir = c.path(name);
    fs::create_dir(&dir).expect("scenario dir in the mount");
    eprintln!("--- {name}: Cairn run in {}", dir.display());
    scenario(&dir);
}

fn start() -> Cluster {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests must run as root");
    Cluster::start(3)
}

fn strerror(e: i32) -> String {
    io::Error::from_raw_os_error(e).to_string()
}

/// libc return values that signal failure with -1.
trait Ret: Copy + std::fmt::Debug {
    fn failed(self) -> bool;
}
impl Ret for i32 {
    fn failed(self) -> bool {
        self == -1
    }
}
impl Ret for isize {
    fn failed(self) -> bool {
        self == -1
    }
}
impl Ret for i64 {
    fn failed(self) -> bool {
        self == -1
    }
}

/// Turns a libc return value into a Result carrying errno.
fn cvt<T: Ret>(r: T) -> io::Result<T> {
    if r.failed() { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// Asserts that `r` failed with errno `want`.
#[track_caller]
fn expect_err<T: std::fmt::Debug>(r: io::Result<T>, want: i32, what: &str) {
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected {}", strerror(want)),
        Err(e) => assert_eq!(e.raw_os_error(), Some(want), "{what}: failed with {e}, expected {}", strerror(want)),
    }
}

fn meta(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

fn nlink(p: &Path) -> u64 {
    meta(p).nlink()
}

fn perm(p: &Path) -> u32 {
    meta(p).mode() & 0o7777
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// A small deterministic random number generator for operation sequences.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Reads exactly `len` bytes at `off` (fewer only at end of file).
fn read_at(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n =
            f.read_at(&mut buf[got..], off + got as u64).unwrap_or_else(|e| panic!("pread {len} bytes at {off}: {e}"));
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    buf
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Index of the first byte where `a` and `b` differ, for readable failures on large buffers.
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

#[track_caller]
fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = first_diff(got, want) {
        panic!(
            "{what}: differs at byte {i} (got {} bytes, want {}): got {:?}, want {:?}",
            got.len(),
            want.len(),
            &got[i..got.len().min(i + 16)],
            &want[i..want.len().min(i + 16)]
        );
    }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn umask() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).expect("Umask in /proc/self/status");
    u32::from_str_radix(line[6..].trim(), 8).unwrap()
}

fn mknod(p: &Path, mode: u32, dev: libc::dev_t) -> io::Result<i32> {
    // SAFETY: valid NUL-terminated path.
    cvt(unsafe { libc::mknod(cpath(p).as_ptr(), mode, dev) })
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> io::Result<i32> {
    // SAFETY: valid NUL-terminated paths.
    cvt(unsafe { libc::renameat2(libc::AT_FDCWD, cpath(from).as_ptr(), libc::AT_FDCWD, cpath(to).as_ptr(), flags) })
}

fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> io::Result<i32> {
    // SAFETY: plain syscall on an open descriptor.
    cvt(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) })
}

fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec { tv_sec: sec, tv_nsec: nsec }
}

fn utimensat(p: &Path, times: Option<[libc::timespec; 2]>, flags: i32) -> io::Result<i32> {
    let ptr = times.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
    // SAFETY: valid path; `ptr` is null or points to two timespecs.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, cpath(p).as_ptr(), ptr, flags) })
}

fn access(p: &Path, mode: i32) -> io::Result<i32> {
    // SAFETY: valid NUL-terminated path.
    cvt(unsafe { libc::access(cpath(p).as_ptr(), mode) })
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<i32> {
    let n = CString::new(name).unwrap();
    // SAFETY: valid path and name; value pointer and length describe a live slice.
    cvt(unsafe { libc::setxattr(cpath(p).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) })
}

fn lsetxattr(p: &Path, name: &str, value: &[u8]) -> io::Result<i32> {
    let n = CString::new(name).unwrap();
    // SAFETY: as for setxattr.
    cvt(unsafe { libc::lsetxattr(cpath(p).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
}

/// getxattr into a buffer of `size` bytes (size 0 asks for the value's size only).
fn getxattr(p: &Path, name: &str, size: usize) -> io::Result<(usize, Vec<u8>)> {
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 { std::ptr::null_mut() } else { buf.as_mut_ptr().cast() };
    // SAFETY: `ptr` is null with size 0 or points to `size` writable bytes.
    let r = cvt(unsafe { libc::getxattr(cpath(p).as_ptr(), n.as_ptr(), ptr, size) })? as usize;
    buf.truncate(r.min(size));
    Ok((r, buf))
}

/// The whole value of an xattr.
fn xattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (len, _) = getxattr(p, name, 0)?;
    let (n, v) = getxattr(p, name, len.max(1))?;
    assert_eq!(n, len, "{name}: size query and read disagree");
    Ok(v)
}

fn listxattr(p: &Path, size: usize) -> io::Result<(usize, Vec<u8>)> {
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 { std::ptr::null_mut() } else { buf.as_mut_ptr().cast() };
    // SAFETY: `ptr` is null with size 0 or points to `size` writable bytes.
    let r = cvt(unsafe { libc::listxattr(cpath(p).as_ptr(), ptr, size) })? as usize;
    buf.truncate(r.min(size));
    Ok((r, buf))
}

/// The `user.` xattr names of a file, sorted.
fn user_xattrs(p: &Path) -> Vec<String> {
    let (len, _) = listxattr(p, 0).expect("listxattr size");
    let (n, buf) = listxattr(p, len.max(1)).expect("listxattr");
    assert_eq!(n, len, "listxattr size query and read disagree");
    if len > 0 {
        assert_eq!(buf.last(), Some(&0), "list must end in NUL");
    }
    let mut names: Vec<String> = buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8(s.to_vec()).unwrap())
        .filter(|s| s.starts_with("user."))
        .collect();
    names.sort();
    names
}

fn removexattr(p: &Path, name: &str) -> io::Result<i32> {
    let n = CString::new(name).unwrap();
    // SAFETY: valid path and name.
    cvt(unsafe { libc::removexattr(cpath(p).as_ptr(), n.as_ptr()) })
}

/// Names in a directory (without `.` and `..`), as raw bytes.
fn list(dir: &Path) -> Vec<Vec<u8>> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| e.expect("readdir entry").file_name().as_bytes().to_vec())
        .collect()
}

/// A libc directory stream, for rewinddir, telldir and seekdir.
struct DirStream(*mut libc::DIR);

impl DirStream {
    fn open(p: &Path) -> DirStream {
        // SAFETY: valid NUL-terminated path.
        let d = unsafe { libc::opendir(cpath(p).as_ptr()) };
        assert!(!d.is_null(), "opendir {}: {}", p.display(), io::Error::last_os_error());
        DirStream(d)
    }

    fn next(&mut self) -> Option<String> {
        // SAFETY: open stream.
        let e = unsafe { libc::readdir(self.0) };
        if e.is_null() {
            return None;
        }
        // SAFETY: readdir returned a valid entry with a NUL-terminated name.
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
        Some(name.to_string_lossy().into_owned())
    }

    fn read_all(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.next()).collect()
    }

    fn rewind(&mut self) {
        // SAFETY: open stream.
        unsafe { libc::rewinddir(self.0) }
    }

    fn tell(&mut self) -> libc::c_long {
        // SAFETY: open stream.
        unsafe { libc::telldir(self.0) }
    }

    fn seek(&mut self, pos: libc::c_long) {
        // SAFETY: open stream, position from telldir on it.
        unsafe { libc::seekdir(self.0, pos) }
    }
}

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: open stream, closed once.
        unsafe { libc::closedir(self.0) };
    }
}

/// Cairn only: mounts the volume a second time (a separate client process with its own caches,
/// which has not seen these files yet) and checks it reads the same bytes. Returns its path.
fn same_through_second_client(c: &Cluster, files: &[&str]) -> PathBuf {
    let other = c.mount_again("second", "");
    for rel in files {
        let want = read(&c.path(rel));
        assert_eq!(meta(&other.join(rel)).len(), want.len() as u64, "{rel}: size through a second client");
        assert_bytes(&read(&other.join(rel)), &want, &format!("{rel} through a second client"));
    }
    other
}

// ---------------------------------------------------------------------------------------------
// lookup, getattr, setattr
// ---------------------------------------------------------------------------------------------

fn attrs_scenario(dir: &Path) {
    let f = dir.join("f");
    fs::write(&f, b"hello").unwrap();
    let m = meta(&f);
    assert!(m.is_file());
    assert_eq!(m.len(), 5);
    assert_eq!(m.nlink(), 1);
    // SAFETY: no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    assert_eq!((m.uid(), m.gid()), (uid, gid), "owner of a new file");
    assert_eq!(m.mode() & 0o7777, 0o666 & !umask(), "mode of a new file");
    assert_eq!(fs::metadata(dir).unwrap().ino(), meta(dir).ino());

    // Lookups that fail.
    expect_err(fs::metadata(dir.join("missing")), libc::ENOENT, "stat missing");
    expect_err(fs::metadata(dir.join("missing/x")), libc::ENOENT, "stat below missing");
    expect_err(fs::metadata(dir.join("f/x")), libc::ENOTDIR, "stat through a file");

    // chmod, including the special bits.
    chmod(&f, 0o640);
    assert_eq!(perm(&f), 0o640);
    chmod(&f, 0o4755);
    assert_eq!(perm(&f), 0o4755);
    let d = dir.join("sticky");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o1777);
    assert_eq!(perm(&d), 0o1777);
    assert!(meta(&d).is_dir());

    // chown; it clears set-user-ID on a regular file even for root.
    // SAFETY: valid path.
    cvt(unsafe { libc::chown(cpath(&f).as_ptr(), 1234, 5678) }).expect("chown");
    let m = meta(&f);
    assert_eq!((m.uid(), m.gid()), (1234, 5678));
    assert_eq!(m.mode() & 0o7777, 0o755, "chown must clear set-user-ID");
    // -1 leaves an id unchanged.
    // SAFETY: valid path.
    cvt(unsafe { libc::chown(cpath(&f).as_ptr(), u32::MAX, 42) }).expect("chown gid only");
    let m = meta(&f);
    assert_eq!((m.uid(), m.gid()), (1234, 42));
    // lchown changes the link, not its target.
    let l = dir.join("l");
    symlink("f", &l).unwrap();
    // SAFETY: valid path.
    cvt(unsafe { libc::lchown(cpath(&l).as_ptr(), 7, 8) }).expect("lchown");
    assert_eq!((meta(&l).uid(), meta(&l).gid()), (7, 8));
    assert_eq!(meta(&f).uid(), 1234);

    // utimensat with explicit times, UTIME_NOW and UTIME_OMIT.
    utimensat(&f, Some([ts(1_000_000_000, 123_456_789), ts(1_100_000_000, 987_654_321)]), 0)
        .expect("utimensat explicit");
    let m = meta(&f);
    assert_eq!((m.atime(), m.atime_nsec()), (1_000_000_000, 123_456_789));
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_100_000_000, 987_654_321));
    let ctime_before = (m.ctime(), m.ctime_nsec());

    let t0 = now_secs();
    utimensat(&f, Some([ts(0, libc::UTIME_OMIT), ts(0, libc::UTIME_NOW)]), 0).expect("utimensat OMIT, NOW");
    let t1 = now_secs();
    let m = meta(&f);
    assert_eq!((m.atime(), m.atime_nsec()), (1_000_000_000, 123_456_789), "UTIME_OMIT changed atime");
    assert!(m.mtime() >= t0 - 1 && m.mtime() <= t1 + 1, "UTIME_NOW mtime {} not in [{t0}, {t1}]", m.mtime());
    assert!((m.ctime(), m.ctime_nsec()) >= ctime_before && m.ctime() >= t0 - 1, "utimensat must update ctime");
    let mtime_now = (m.mtime(), m.mtime_nsec());

    utimensat(&f, Some([ts(0, libc::UTIME_NOW), ts(0, libc::UTIME_OMIT)]), 0).expect("utimensat NOW, OMIT");
    let t2 = now_secs();
    let m = meta(&f);
    assert_eq!((m.mtime(), m.mtime_nsec()), mtime_now, "UTIME_OMIT changed mtime");
    assert!(m.atime() >= t0 - 1 && m.atime() <= t2 + 1, "UTIME_NOW atime");

    // Both omitted: nothing changes.
    utimensat(&f, Some([ts(5, libc::UTIME_OMIT), ts(5, libc::UTIME_OMIT)]), 0).expect("utimensat OMIT, OMIT");
    let m2 = meta(&f);
    assert_eq!(
        (m2.atime(), m2.atime_nsec(), m2.mtime(), m2.mtime_nsec()),
        (m.atime(), m.atime_nsec(), m.mtime(), m.mtime_nsec())
    );

    // NULL times: both now. Set an old time first so the change is visible.
    utimensat(&f, Some([ts(10, 0), ts(20, 0)]), 0).unwrap();
    utimensat(&f, None, 0).expect("utimensat NULL");
    let m = meta(&f);
    assert!(m.atime() >= t0 - 1 && m.mtime() >= t0 - 1, "NULL times");

    // On a symlink itself with AT_SYMLINK_NOFOLLOW; the target keeps its times.
    utimensat(&f, Some([ts(300, 0), ts(400, 0)]), 0).unwrap();
    utimensat(&l, Some([ts(100, 1), ts(200, 2)]), libc::AT_SYMLINK_NOFOLLOW).expect("utimensat on a symlink");
    assert_eq!((meta(&l).mtime(), meta(&l).mtime_nsec()), (200, 2));
    assert_eq!(meta(&f).mtime(), 400);

    // futimens on a descriptor.
    let fd = File::open(&f).unwrap();
    let times = [ts(111, 0), ts(222, 333)];
    // SAFETY: open descriptor, two timespecs.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).expect("futimens");
    assert_eq!((meta(&f).mtime(), meta(&f).mtime_nsec()), (222, 333));
    drop(fd);

    // Truncate down, then up: the bytes past the short size read as zeros.
    let t = dir.join("t");
    let data = pattern(1, 10_000);
    fs::write(&t, &data).unwrap();
    // SAFETY: valid path.
    cvt(unsafe { libc::truncate(cpath(&t).as_ptr(), 100) }).expect("truncate down");
    assert_eq!(meta(&t).len(), 100);
    assert_bytes(&read(&t), &data[..100], "after truncate to 100");
    // SAFETY: valid path.
    cvt(unsafe { libc::truncate(cpath(&t).as_ptr(), 5000) }).expect("truncate up");
    assert_eq!(meta(&t).len(), 5000);
    let got = read(&t);
    assert_bytes(&got[..100], &data[..100], "head after truncate up");
    assert!(is_zero(&got[100..]), "bytes past a truncate must read as zeros");

    // The same through a descriptor, with the write still fresh.
    let fd = OpenOptions::new().read(true).write(true).open(&t).unwrap();
    let p2 = pattern(2, 3000);
    fd.write_all_at(&p2, 1000).unwrap();
    fd.set_len(1500).unwrap();
    fd.set_len(4000).unwrap();
    assert_eq!(fd.metadata().unwrap().len(), 4000);
    let got = read(&t);
    assert_bytes(&got[1000..1500], &p2[..500], "kept part");
    assert!(is_zero(&got[1500..]), "ftruncate down/up must leave zeros");
    drop(fd);

    // Across a 64 MiB boundary (Cairn's chunk size), with data on both sides of the cut.
    let big = dir.join("big");
    let fd = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&big).unwrap();
    let at = 64 * MIB - MIB / 2;
    let p3 = pattern(3, MIB as usize);
    fd.write_all_at(&p3, at).unwrap();
    fd.set_len(64 * MIB + 100).unwrap();
    fd.set_len(66 * MIB).unwrap();
    drop(fd);
    let fd = File::open(&big).unwrap();
    assert_eq!(fd.metadata().unwrap().len(), 66 * MIB);
    let got = read_at(&fd, at, (66 * MIB - at) as usize);
    let kept = (MIB / 2 + 100) as usize;
    assert_bytes(&got[..kept], &p3[..kept], "data before the cut");
    assert!(is_zero(&got[kept..]), "data past the cut must read as zeros");
    assert!(is_zero(&read_at(&fd, 0, 4096)), "hole at the start");
    drop(fd);

    // Writes update mtime at once, before the file is closed; so do directory changes for
    // the directory's mtime. Times are first set far in the past so the update is visible.
    let old = Some([ts(1000, 0), ts(1000, 0)]);
    let recent = |p: &Path, what: &str| {
        let m = meta(p);
        assert!(
            m.mtime() >= t0 - 1 && m.ctime() >= t0 - 1,
            "{what}: mtime {} ctime {} not updated (test started at {t0})",
            m.mtime(),
            m.ctime()
        );
    };
    let w = OpenOptions::new().write(true).open(&f).unwrap();
    utimensat(&f, old, 0).unwrap();
    w.write_all_at(b"x", 2).unwrap();
    recent(&f, "write, before close (stat)");
    assert!(w.metadata().unwrap().mtime() >= t0 - 1, "write, before close (fstat)");
    drop(w);
    recent(&f, "write, after close");
    utimensat(&f, old, 0).unwrap();
    let w = OpenOptions::new().write(true).truncate(true).open(&f).unwrap();
    recent(&f, "open with O_TRUNC");
    drop(w);
    let sub = dir.join("sub");
    fs::create_dir(&sub).unwrap();
    let ops: [(&str, &dyn Fn()); 8] = [
        ("create", &|| fs::write(sub.join("a"), b"").unwrap()),
        ("mkdir", &|| fs::create_dir(sub.join("d")).unwrap()),
        ("symlink", &|| symlink("a", sub.join("s")).unwrap()),
        ("link", &|| fs::hard_link(sub.join("a"), sub.join("h")).unwrap()),
        ("rename", &|| fs::rename(sub.join("h"), sub.join("h2")).unwrap()),
        ("unlink", &|| fs::remove_file(sub.join("h2")).unwrap()),
        ("rmdir", &|| fs::remove_dir(sub.join("d")).unwrap()),
        ("mknod", &|| {
            mknod(&sub.join("n"), libc::S_IFIFO | 0o600, 0).unwrap();
        }),
    ];
    for (what, op) in ops {
        utimensat(&sub, old, 0).unwrap();
        op();
        recent(&sub, &format!("directory after {what}"));
    }
    // A rename between directories updates both.
    utimensat(&sub, old, 0).unwrap();
    utimensat(dir, old, 0).unwrap();
    fs::rename(sub.join("a"), dir.join("moved")).unwrap();
    recent(&sub, "source directory of a rename");
    recent(dir, "target directory of a rename");

    // Explicit times set while writes are still buffered survive the close (cp -p does this).
    let w = OpenOptions::new().write(true).open(&f).unwrap();
    w.write_all_at(b"late data", 0).unwrap();
    let times = [ts(5000, 6), ts(7000, 8)];
    // SAFETY: open descriptor, two timespecs.
    cvt(unsafe { libc::futimens(w.as_raw_fd(), times.as_ptr()) }).expect("futimens");
    drop(w);
    let m = meta(&f);
    assert_eq!((m.mtime(), m.mtime_nsec(), m.atime(), m.atime_nsec()), (7000, 8, 5000, 6), "times after close");
    assert_eq!(&read(&f)[..9], b"late data");

    // Truncating a directory.
    // SAFETY: valid path.
    expect_err(cvt(unsafe { libc::truncate(cpath(dir).as_ptr(), 0) }), libc::EISDIR, "truncate a directory");
}

#[test]
fn lookup_getattr_setattr_truncate() {
    let c = start();
    on_both(&c, "attrs", attrs_scenario);
    same_through_second_client(&c, &["attrs/t", "attrs/big", "attrs/f"]);
}

// ---------------------------------------------------------------------------------------------
// create, open flags, read and write at offsets, sparse and > 4 GiB files, fsync, close
// ---------------------------------------------------------------------------------------------

fn open_scenario(dir: &Path) {
    let f = dir.join("f");
    let w = OpenOptions::new().write(true).create_new(true).open(&f).expect("O_CREAT|O_EXCL on a new name");
    drop(w);
    expect_err(OpenOptions::new().write(true).create_new(true).open(&f), libc::EEXIST, "O_EXCL on an existing file");
    // O_EXCL does not follow a dangling symlink.
    symlink("nowhere", dir.join("dangling")).unwrap();
    expect_err(
        OpenOptions::new().write(true).create_new(true).open(dir.join("dangling")),
        libc::EEXIST,
        "O_EXCL on a dangling symlink",
    );
    assert!(!dir.join("nowhere").exists());
    // O_CREAT without O_EXCL through a dangling symlink creates its target.
    fs::write(dir.join("dangling"), b"via link").unwrap();
    assert_eq!(read(&dir.join("nowhere")), b"via link");
    expect_err(File::open(dir.join("missing")), libc::ENOENT, "open missing");
    expect_err(File::create(dir.join("nodir/x")), libc::ENOENT, "create below a missing dir");
    expect_err(File::create(dir.join("f/x")), libc::ENOTDIR, "create below a file");

    // O_CREAT on an existing file keeps its data.
    fs::write(&f, b"0123456789").unwrap();
    let w = OpenOptions::new().write(true).create(true).truncate(false).open(&f).unwrap();
    assert_eq!(w.metadata().unwrap().len(), 10);
    drop(w);

    // O_TRUNC empties it at open.
    let mut w = OpenOptions::new().write(true).truncate(true).open(&f).unwrap();
    assert_eq!(w.metadata().unwrap().len(), 0);
    assert_eq!(meta(&f).len(), 0);
    w.write_all(b"ab").unwrap();
    drop(w);
    assert_eq!(read(&f), b"ab");

    // O_APPEND writes at the end, wherever the end moved to and wherever the offset is.
    let mut a = OpenOptions::new().append(true).open(&f).unwrap();
    a.write_all(b"cd").unwrap();
    let w = OpenOptions::new().write(true).open(&f).unwrap();
    w.write_all_at(b"XYZW0", 0).unwrap();
    a.write_all(b"ef").unwrap();
    a.seek(SeekFrom::Start(0)).unwrap();
    a.write_all(b"!").unwrap();
    drop(a);
    assert_eq!(read(&f), b"XYZW0ef!");

    // Wrong access mode: EBADF.
    let mut r = File::open(&f).unwrap();
    expect_err((&r).write(b"x"), libc::EBADF, "write on O_RDONLY");
    let mut w = w;
    let mut buf = [0u8; 4];
    expect_err(w.read(&mut buf), libc::EBADF, "read on O_WRONLY");
    drop(w);
    let mut s = String::new();
    r.read_to_string(&mut s).unwrap();
    assert_eq!(s, "XYZW0ef!");

    // Directories.
    expect_err(OpenOptions::new().write(true).open(dir), libc::EISDIR, "open a directory for writing");
    expect_err(
        OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(&f),
        libc::ENOTDIR,
        "O_DIRECTORY on a file",
    );

    // Random reads and writes at arbitrary offsets against an in-memory model, crossing
    // Cairn's 1 MiB block boundaries; every few steps the whole file is compared through a
    // fresh descriptor (which also drops the kernel's page cache of the file).
    let p = dir.join("rw");
    let fd = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
    let mut model: Vec<u8> = Vec::new();
    let mut rng = Rng(0x5eed);
    for step in 0..240u64 {
        let off = rng.below(10 * MIB);
        let len = 1 + rng.below(if step % 8 == 0 { 2 * MIB } else { 20_000 }) as usize;
        let op = rng.below(12);
        if op == 0 {
            // Truncate, down or up; what lay past the new end must read as zeros later.
            let size = rng.below(11 * MIB) as usize;
            fd.set_len(size as u64).unwrap();
            model.resize(size, 0);
        } else if op < 8 {
            let data = pattern(step + 100, len);
            fd.write_all_at(&data, off).unwrap();
            let end = off as usize + len;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[off as usize..end].copy_from_slice(&data);
        } else {
            let got = read_at(&fd, off, len);
            let lo = (off as usize).min(model.len());
            let hi = (off as usize + len).min(model.len());
            assert_bytes(&got, &model[lo..hi], &format!("step {step}: pread {len} at {off}"));
        }
        if step % 40 == 39 {
            assert_eq!(meta(&p).len(), model.len() as u64, "size at step {step}");
            assert_bytes(&read(&p), &model, &format!("whole file at step {step}"));
        }
    }
    fd.sync_all().expect("fsync");
    fd.sync_data().expect("fdatasync");
    // Reading past the end returns nothing.
    assert!(read_at(&fd, model.len() as u64 + 10, 100).is_empty());
    drop(fd);
    assert_bytes(&read(&p), &model, "whole file after close");

    // O_EXCL is atomic: of several threads racing to create one name, exactly one wins.
    for round in 0..20 {
        let name = dir.join(format!("race-{round}"));
        let wins = std::thread::scope(|s| {
            let tries: Vec<_> =
                (0..6).map(|_| s.spawn(|| OpenOptions::new().write(true).create_new(true).open(&name))).collect();
            let mut wins = 0;
            for t in tries {
                match t.join().unwrap() {
                    Ok(_) => wins += 1,
                    Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "losing O_EXCL: {e}"),
                }
            }
            wins
        });
        assert_eq!(wins, 1, "round {round}: O_EXCL winners");
    }

    // O_APPEND writes are atomic: records appended by several threads at once all land whole.
    let log = dir.join("log");
    const REC: usize = 1000;
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let log = &log;
            s.spawn(move || {
                let mut f = OpenOptions::new().append(true).create(true).open(log).unwrap();
                for i in 0..50u8 {
                    let mut rec = vec![b'a' + t; REC];
                    rec[0] = i;
                    rec[REC - 1] = b'\n';
                    f.write_all(&rec).unwrap();
                }
            });
        }
    });
    let got = read(&log);
    assert_eq!(got.len(), 4 * 50 * REC, "appended size");
    let mut next = [0u8; 4];
    for rec in got.chunks(REC) {
        let t = rec[1].wrapping_sub(b'a');
        assert!(t < 4 && rec[1..REC - 1].iter().all(|&b| b == rec[1]), "torn record");
        assert_eq!(rec[0], next[t as usize], "records of one writer in order");
        next[t as usize] += 1;
    }

    // Sequential read and write through the std::io cursor.
    let mut fd = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fd.seek(SeekFrom::Start(7)).unwrap();
    fd.write_all(b"cursor").unwrap();
    assert_eq!(fd.stream_position().unwrap(), 13);
    fd.seek(SeekFrom::Start(5)).unwrap();
    let mut b = [0u8; 10];
    fd.read_exact(&mut b).unwrap();
    assert_eq!(&b[2..8], b"cursor");
    assert_eq!(fd.seek(SeekFrom::End(0)).unwrap(), model.len() as u64, "SEEK_END");
    drop(fd);

    // A sparse file reads zeros in its holes.
    let s = dir.join("sparse");
    let fd = File::create(&s).unwrap();
    fd.write_all_at(b"end", 10 * MIB).unwrap();
    fd.write_all_at(b"mid", 5 * MIB + 3).unwrap();
    drop(fd);
    let got = read(&s);
    assert_eq!(got.len() as u64, 10 * MIB + 3);
    let mut want = vec![0u8; got.len()];
    want[(5 * MIB + 3) as usize..][..3].copy_from_slice(b"mid");
    want[(10 * MIB) as usize..].copy_from_slice(b"end");
    assert_bytes(&got, &want, "sparse file");

    // Past 4 GiB: offsets must not be truncated to 32 bits anywhere.
    let big = dir.join("big");
    const FAR: u64 = 5 << 30;
    let fd = File::create(&big).unwrap();
    fd.write_all_at(b"beyond 4 GiB", FAR).unwrap();
    fd.write_all_at(b"@4G", 1 << 32).unwrap();
    fd.sync_all().unwrap();
    drop(fd);
    assert_eq!(meta(&big).len(), FAR + 12);
    let fd = File::open(&big).unwrap();
    assert_eq!(read_at(&fd, FAR, 100), b"beyond 4 GiB");
    assert_eq!(read_at(&fd, 1 << 32, 3), b"@4G");
    assert!(is_zero(&read_at(&fd, 0, 4096)), "zeros at 0");
    assert!(is_zero(&read_at(&fd, (1 << 32) - 4096, 4096)), "zeros below 4 GiB");
    assert!(is_zero(&read_at(&fd, (1 << 32) + 3, 4096)), "zeros after 4 GiB");
    let mut want = vec![0u8; 4];
    want.extend_from_slice(b"beyond 4 GiB");
    assert_eq!(read_at(&fd, FAR - 4, 64), want, "read across the hole's end");
    assert!(read_at(&fd, FAR + 12, 10).is_empty(), "read at EOF");
    drop(fd);

    // fsync, fdatasync and close report success through raw descriptors, also on directories.
    let raw = dir.join("raw");
    let path = cpath(&raw);
    // SAFETY: valid path; the descriptor is closed below.
    let fd = cvt(unsafe { libc::open(path.as_ptr(), libc::O_CREAT | libc::O_RDWR, 0o644) }).expect("open");
    // SAFETY: open descriptor and a live buffer.
    let n = cvt(unsafe { libc::write(fd, b"raw".as_ptr().cast(), 3) }).expect("write");
    assert_eq!(n, 3);
    // SAFETY: open descriptor.
    cvt(unsafe { libc::fsync(fd) }).expect("fsync");
    // SAFETY: open descriptor.
    cvt(unsafe { libc::fdatasync(fd) }).expect("fdatasync");
    // SAFETY: open descriptor, closed once.
    cvt(unsafe { libc::close(fd) }).expect("close");
    assert_eq!(read(&raw), b"raw");
    let d = File::open(dir).unwrap();
    d.sync_all().expect("fsync of a directory");

    // Shared memory maps: reads see the file, stores reach it after msync.
    let m = dir.join("mapped");
    let data = pattern(11, 3 * 4096 + 100);
    fs::write(&m, &data).unwrap();
    let fd = OpenOptions::new().read(true).write(true).open(&m).unwrap();
    let len = data.len();
    // SAFETY: maps an open descriptor; the mapping is only used within `len` and unmapped below.
    let ptr = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
    };
    assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", io::Error::last_os_error());
    // SAFETY: the mapping is `len` bytes long and stays mapped while the slice is used.
    let map = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len) };
    assert_bytes(map, &data, "mapped bytes");
    map[4096..4096 + 7].copy_from_slice(b"mmapped");
    map[len - 1] = b'!';
    // SAFETY: the mapping from above.
    cvt(unsafe { libc::msync(ptr, len, libc::MS_SYNC) }).expect("msync");
    // SAFETY: unmapped once; `map` is not used afterwards.
    cvt(unsafe { libc::munmap(ptr, len) }).expect("munmap");
    drop(fd);
    let mut want = data;
    want[4096..4096 + 7].copy_from_slice(b"mmapped");
    want[len - 1] = b'!';
    assert_bytes(&read(&m), &want, "file after msync");
    assert_eq!(meta(&m).len(), len as u64);
}

#[test]
fn open_create_read_write_fsync() {
    let c = start();
    on_both(&c, "open", open_scenario);
    let other = same_through_second_client(&c, &["open/f", "open/rw", "open/sparse", "open/mapped"]);
    let big = File::open(other.join("open/big")).unwrap();
    assert_eq!(big.metadata().unwrap().len(), (5 << 30) + 12);
    assert_eq!(read_at(&big, 5 << 30, 100), b"beyond 4 GiB");
    assert_eq!(read_at(&big, 1 << 32, 3), b"@4G");
    assert!(is_zero(&read_at(&big, (1 << 32) - 4096, 4096)));
    drop(big);

    // The largest file size (16 TiB): a write crossing it is cut short, one starting at it
    // fails with EFBIG, as Linux does at a filesystem's limit.
    const MAX: u64 = 1 << 44;
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(c.path("max")).unwrap();
    assert_eq!(f.write_at(b"0123456789", MAX - 4).expect("write crossing the limit"), 4);
    expect_err(f.write_at(b"x", MAX), libc::EFBIG, "write at the limit");
    expect_err(f.set_len(MAX + 1), libc::EFBIG, "truncate past the limit");
    assert_eq!(f.metadata().unwrap().len(), MAX);
    drop(f);
    assert_eq!(read_at(&File::open(c.path("max")).unwrap(), MAX - 8, 100), b"\x00\x00\x00\x000123");
}

// ---------------------------------------------------------------------------------------------
// mkdir, rmdir, unlink, link, symlink, mknod
// ---------------------------------------------------------------------------------------------

fn dirs_scenario(dir: &Path) {
    let base_links = nlink(dir);
    let d = dir.join("d");
    fs::create_dir(&d).unwrap();
    assert_eq!(nlink(&d), 2, "new directory");
    assert_eq!(nlink(dir), base_links + 1, "parent of a new directory");
    assert_eq!(perm(&d), 0o777 & !umask());
    let d750 = dir.join("d750");
    fs::DirBuilder::new().mode(0o750).create(&d750).unwrap();
    assert_eq!(perm(&d750), 0o750 & !umask());
    fs::remove_dir(&d750).unwrap();

    expect_err(fs::create_dir(&d), libc::EEXIST, "mkdir existing");
    expect_err(fs::create_dir(dir.join("no/x")), libc::ENOENT, "mkdir below missing");
    fs::write(d.join("file"), b"x").unwrap();
    expect_err(fs::create_dir(d.join("file")), libc::EEXIST, "mkdir over a file");
    expect_err(fs::create_dir(d.join("file/x")), libc::ENOTDIR, "mkdir below a file");
    for s in ["a", "b", "c"] {
        fs::create_dir(d.join(s)).unwrap();
    }
    fs::write(d.join("g"), b"").unwrap();
    assert_eq!(nlink(&d), 5, "directory nlink = 2 + subdirectories");

    expect_err(fs::remove_dir(&d), libc::ENOTEMPTY, "rmdir non-empty");
    expect_err(fs::remove_dir(d.join("file")), libc::ENOTDIR, "rmdir a file");
    expect_err(fs::remove_file(d.join("a")), libc::EISDIR, "unlink a directory");
    expect_err(fs::remove_dir(d.join("nope")), libc::ENOENT, "rmdir missing");
    expect_err(fs::remove_file(d.join("nope")), libc::ENOENT, "unlink missing");
    expect_err(fs::remove_file(d.join("file/x")), libc::ENOTDIR, "unlink below a file");
    // SAFETY: valid paths.
    expect_err(cvt(unsafe { libc::rmdir(cpath(&d.join("a/.")).as_ptr()) }), libc::EINVAL, "rmdir a/.");
    // SAFETY: valid paths.
    expect_err(cvt(unsafe { libc::rmdir(cpath(&d.join("a/..")).as_ptr()) }), libc::ENOTEMPTY, "rmdir a/..");
    fs::remove_dir(d.join("a")).unwrap();
    assert_eq!(nlink(&d), 4, "after rmdir of a subdirectory");
    fs::rename(d.join("b"), dir.join("b")).unwrap();
    assert_eq!(nlink(&d), 3, "after moving a subdirectory out");
    assert_eq!(nlink(dir), base_links + 2, "after moving a subdirectory in");
    fs::rename(dir.join("b"), d.join("c/b")).unwrap();
    assert_eq!(nlink(&d.join("c")), 3);
    assert_eq!(nlink(dir), base_links + 1);
    expect_err(fs::metadata(dir.join("b")), libc::ENOENT, "moved away");
    assert!(meta(&d.join("c/b")).is_dir());

    // A set-group-ID directory passes its group on, and its bit to subdirectories.
    let g = dir.join("sgid");
    fs::create_dir(&g).unwrap();
    // A create before the change: the server's copy of the directory's attributes must
    // follow the chown and chmod.
    fs::write(g.join("before"), b"").unwrap();
    // SAFETY: valid path.
    cvt(unsafe { libc::chown(cpath(&g).as_ptr(), u32::MAX, 4321) }).unwrap();
    chmod(&g, 0o2775);
    fs::write(g.join("f"), b"").unwrap();
    fs::create_dir(g.join("d")).unwrap();
    mknod(&g.join("p"), libc::S_IFIFO | 0o644, 0).unwrap();
    for n in ["f", "d", "p"] {
        assert_eq!(meta(&g.join(n)).gid(), 4321, "group of {n} in a setgid directory");
    }
    assert_ne!(perm(&g.join("d")) & 0o2000, 0, "subdirectory inherits setgid");
    assert_eq!(perm(&g.join("f")) & 0o2000, 0, "files do not inherit setgid");

    // Nothing can be created in a directory removed while open, even right after a create.
    let gone = dir.join("gone");
    fs::create_dir(&gone).unwrap();
    let held = File::open(&gone).unwrap();
    fs::write(gone.join("x"), b"").unwrap();
    fs::remove_file(gone.join("x")).unwrap();
    fs::remove_dir(&gone).unwrap();
    let name = CString::new("y").unwrap();
    // SAFETY: a valid descriptor and NUL-terminated name.
    let r = unsafe { libc::openat(held.as_raw_fd(), name.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644) };
    expect_err(cvt(r), libc::ENOENT, "create in a removed directory");

    // Hard links.
    let f = d.join("file");
    fs::hard_link(&f, d.join("l1")).unwrap();
    fs::hard_link(&f, dir.join("l2")).unwrap();
    assert_eq!(nlink(&f), 3);
    assert_eq!(nlink(&dir.join("l2")), 3);
    assert_eq!(meta(&f).ino(), meta(&dir.join("l2")).ino());
    fs::write(dir.join("l2"), b"shared").unwrap();
    assert_eq!(read(&d.join("l1")), b"shared");
    fs::remove_file(&f).unwrap();
    assert_eq!(nlink(&d.join("l1")), 2);
    assert_eq!(read(&dir.join("l2")), b"shared");
    expect_err(fs::hard_link(d.join("c"), d.join("dirlink")), libc::EPERM, "hard link to a directory");
    expect_err(fs::hard_link(d.join("l1"), dir.join("l2")), libc::EEXIST, "link over an existing name");
    expect_err(fs::hard_link(d.join("missing"), d.join("x")), libc::ENOENT, "link of a missing file");
    assert_eq!(nlink(&d), 3, "links to files do not change a directory's nlink");

    // Symlinks.
    let sl = dir.join("sl");
    symlink("target-file", &sl).unwrap();
    assert_eq!(fs::read_link(&sl).unwrap(), PathBuf::from("target-file"));
    let m = meta(&sl);
    assert!(m.file_type().is_symlink());
    assert_eq!(m.len(), "target-file".len() as u64, "symlink size");
    assert_eq!(m.mode() & 0o777, 0o777);
    expect_err(fs::metadata(&sl), libc::ENOENT, "stat a dangling symlink");
    fs::write(dir.join("target-file"), b"t").unwrap();
    assert_eq!(read(&sl), b"t");
    assert!(fs::metadata(&sl).unwrap().is_file());
    expect_err(symlink("x", &sl), libc::EEXIST, "symlink over an existing name");
    expect_err(fs::read_link(dir.join("target-file")), libc::EINVAL, "readlink on a file");
    let long: String = "abcdefgh/".repeat(455);
    let long = &long[..4095];
    symlink(long, dir.join("long")).expect("4095-byte symlink target");
    assert_eq!(fs::read_link(dir.join("long")).unwrap().as_os_str().as_bytes(), long.as_bytes());
    symlink("d", dir.join("dirlink")).unwrap();
    assert!(fs::metadata(dir.join("dirlink")).unwrap().is_dir());
    assert!(list(&dir.join("dirlink")).contains(&b"g".to_vec()));
    // link() does not follow a symlink: the new name is a second link to the symlink.
    fs::hard_link(&sl, dir.join("sl2")).unwrap();
    assert!(meta(&dir.join("sl2")).file_type().is_symlink());
    assert_eq!(nlink(&sl), 2);

    // Special files.
    let fifo = dir.join("fifo");
    // SAFETY: valid path.
    cvt(unsafe { libc::mkfifo(cpath(&fifo).as_ptr(), 0o640) }).expect("mkfifo");
    let m = meta(&fifo);
    assert!(m.file_type().is_fifo());
    assert_eq!(m.mode() & 0o777, 0o640 & !umask());
    let mut p =
        OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(&fifo).expect("open the fifo");
    p.write_all(b"pipe").unwrap();
    let mut b = [0u8; 4];
    p.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pipe");
    drop(p);

    mknod(&dir.join("sock"), libc::S_IFSOCK | 0o600, 0).expect("mknod socket");
    assert!(meta(&dir.join("sock")).file_type().is_socket());
    let live = dir.join("live.sock");
    let listener = UnixListener::bind(&live).expect("bind a unix socket");
    assert!(meta(&live).file_type().is_socket());
    let mut client = UnixStream::connect(&live).expect("connect through the socket file");
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(b"s").unwrap();
    let mut b = [0u8; 1];
    server.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"s");

    let dev = libc::makedev(259, 65539);
    mknod(&dir.join("chr"), libc::S_IFCHR | 0o600, dev).expect("mknod char device");
    let m = meta(&dir.join("chr"));
    assert!(m.file_type().is_char_device());
    assert_eq!((libc::major(m.rdev()), libc::minor(m.rdev())), (259, 65539), "st_rdev of a char device");
    mknod(&dir.join("blk"), libc::S_IFBLK | 0o600, libc::makedev(8, 17)).expect("mknod block device");
    let m = meta(&dir.join("blk"));
    assert!(m.file_type().is_block_device());
    assert_eq!((libc::major(m.rdev()), libc::minor(m.rdev())), (8, 17));
    mknod(&dir.join("reg"), libc::S_IFREG | 0o644, 0).expect("mknod regular");
    assert!(meta(&dir.join("reg")).is_file());
    assert_eq!(meta(&dir.join("reg")).len(), 0);
    expect_err(mknod(&dir.join("chr"), libc::S_IFCHR | 0o600, dev), libc::EEXIST, "mknod over an existing name");
}

#[test]
fn mkdir_rmdir_unlink_links_and_special_files() {
    let c = start();
    on_both(&c, "dirs", dirs_scenario);
}

// ---------------------------------------------------------------------------------------------
// rename and renameat2
// ---------------------------------------------------------------------------------------------

/// Readers (in `read_dir`) racing a writer (in `write_dir`, the same directory, possibly seen
/// through another client) that replaces a file by rename always find a whole version.
fn rename_race(write_dir: &Path, read_dir: &Path) {
    let (target, seen) = (write_dir.join("current"), read_dir.join("current"));
    fs::write(&target, pattern(0, 10_000)).unwrap();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let readers: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let mut reads = 0u32;
                    while !done.load(Ordering::Acquire) || reads == 0 {
                        let got = fs::read(&seen).expect("the name must always exist");
                        assert_eq!(got.len(), 10_000, "partial version");
                        assert!((0..40).any(|v| got == pattern(v, 10_000)), "torn version");
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for v in 1..40 {
            let tmp = write_dir.join(format!(".current.tmp{v}"));
            fs::write(&tmp, pattern(v, 10_000)).unwrap();
            fs::rename(&tmp, &target).unwrap();
        }
        done.store(true, Ordering::Release);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
    });
    assert_eq!(read(&target), pattern(39, 10_000));
    fs::remove_file(&target).unwrap();
}

fn rename_scenario(dir: &Path) {
    let j = |s: &str| dir.join(s);
    let base_links = nlink(dir);

    // Replacing a file is atomic; a descriptor of the old target still reads the old data.
    fs::write(j("a"), b"A").unwrap();
    fs::write(j("b"), b"B").unwrap();
    let held = File::open(j("b")).unwrap();
    fs::rename(j("a"), j("b")).unwrap();
    assert_eq!(read(&j("b")), b"A");
    expect_err(fs::metadata(j("a")), libc::ENOENT, "source after rename");
    assert_eq!(read_at(&held, 0, 10), b"B", "replaced file through an old fd");
    drop(held);

    rename_race(dir, dir);

    // A file with two links replaced through one of them keeps the other.
    fs::write(j("l1"), b"linked").unwrap();
    fs::hard_link(j("l1"), j("l2")).unwrap();
    fs::write(j("l3"), b"other").unwrap();
    fs::rename(j("l3"), j("l2")).unwrap();
    assert_eq!(nlink(&j("l1")), 1, "the replaced inode lost one link");
    assert_eq!(read(&j("l1")), b"linked");
    assert_eq!(read(&j("l2")), b"other");
    fs::remove_file(j("l1")).unwrap();
    fs::remove_file(j("l2")).unwrap();

    // Over an empty directory.
    fs::create_dir(j("d1")).unwrap();
    fs::write(j("d1/inside"), b"in").unwrap();
    fs::create_dir(j("d2")).unwrap();
    assert_eq!(nlink(dir), base_links + 2);
    fs::rename(j("d1"), j("d2")).expect("rename a directory over an empty one");
    assert_eq!(read(&j("d2/inside")), b"in");
    expect_err(fs::metadata(j("d1")), libc::ENOENT, "old directory name");
    assert_eq!(nlink(dir), base_links + 1, "one directory replaced another");

    // Over a non-empty directory.
    fs::create_dir(j("d3")).unwrap();
    fs::write(j("d3/x"), b"").unwrap();
    expect_err(fs::rename(j("d3"), j("d2")), libc::ENOTEMPTY, "rename over a non-empty directory");
    assert!(j("d3/x").exists() && j("d2/inside").exists());

    // Kind mismatches.
    expect_err(fs::rename(j("b"), j("d2")), libc::EISDIR, "file over a directory");
    expect_err(fs::rename(j("d2"), j("b")), libc::ENOTDIR, "directory over a file");
    expect_err(fs::rename(j("nope"), j("x")), libc::ENOENT, "missing source");
    expect_err(fs::rename(j("b"), j("nodir/x")), libc::ENOENT, "target parent missing");
    expect_err(fs::rename(j("b"), j("b/x")), libc::ENOTDIR, "target parent is a file");

    // Two links to the same file: rename does nothing and both names stay.
    fs::hard_link(j("b"), j("b2")).unwrap();
    fs::rename(j("b"), j("b2")).unwrap();
    assert!(j("b").exists() && j("b2").exists());
    assert_eq!(nlink(&j("b")), 2);
    // Renaming onto itself.
    fs::rename(j("b"), j("b")).unwrap();
    assert_eq!(read(&j("b")), b"A");

    // RENAME_NOREPLACE.
    fs::write(j("n1"), b"1").unwrap();
    fs::write(j("n2"), b"2").unwrap();
    expect_err(
        renameat2(&j("n1"), &j("n2"), libc::RENAME_NOREPLACE),
        libc::EEXIST,
        "RENAME_NOREPLACE over an existing file",
    );
    assert_eq!((read(&j("n1")), read(&j("n2"))), (b"1".to_vec(), b"2".to_vec()));
    renameat2(&j("n1"), &j("n3"), libc::RENAME_NOREPLACE).expect("NOREPLACE to a new name");
    assert_eq!(read(&j("n3")), b"1");
    assert!(!j("n1").exists());

    // RENAME_EXCHANGE between a file and a directory in different parents.
    fs::create_dir(j("p")).unwrap();
    fs::create_dir(j("q")).unwrap();
    fs::create_dir(j("p/x")).unwrap();
    fs::write(j("p/x/child"), b"c").unwrap();
    fs::write(j("q/y"), b"Y").unwrap();
    let (p_links, q_links) = (nlink(&j("p")), nlink(&j("q")));
    let (x_ino, y_ino) = (meta(&j("p/x")).ino(), meta(&j("q/y")).ino());
    renameat2(&j("p/x"), &j("q/y"), libc::RENAME_EXCHANGE).expect("RENAME_EXCHANGE");
    assert_eq!(read(&j("p/x")), b"Y");
    assert_eq!(read(&j("q/y/child")), b"c");
    assert_eq!(meta(&j("p/x")).ino(), y_ino);
    assert_eq!(meta(&j("q/y")).ino(), x_ino);
    assert_eq!(nlink(&j("p")), p_links - 1, "exchange moved a subdirectory out");
    assert_eq!(nlink(&j("q")), q_links + 1, "exchange moved a subdirectory in");
    assert_eq!(fs::metadata(j("q/y/..")).unwrap().ino(), meta(&j("q")).ino(), ".. of an exchanged directory");
    // Two files in one directory.
    renameat2(&j("n2"), &j("n3"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!((read(&j("n2")), read(&j("n3"))), (b"1".to_vec(), b"2".to_vec()));
    expect_err(
        renameat2(&j("n2"), &j("gone"), libc::RENAME_EXCHANGE),
        libc::ENOENT,
        "RENAME_EXCHANGE with a missing target",
    );
    expect_err(
        renameat2(&j("n2"), &j("n3"), libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE),
        libc::EINVAL,
        "EXCHANGE|NOREPLACE",
    );

    // A directory into its own subtree.
    fs::create_dir_all(j("t/sub/deep")).unwrap();
    expect_err(fs::rename(j("t"), j("t/sub/deep/t")), libc::EINVAL, "directory into its own subtree");
    expect_err(fs::rename(j("t"), j("t/sub")), libc::EINVAL, "directory over its own child");
    expect_err(fs::rename(j("t/sub"), j("t/sub/deep/x")), libc::EINVAL, "subdirectory into its own subtree");
    expect_err(fs::rename(j("t/sub/deep"), j("t")), libc::ENOTEMPTY, "directory over its own ancestor");
    expect_err(
        renameat2(&j("t"), &j("t/sub/deep"), libc::RENAME_EXCHANGE),
        libc::EINVAL,
        "exchange a directory with its own descendant",
    );
    // After moving a subtree elsewhere the check follows the new place.
    fs::rename(j("t/sub"), j("q/sub")).unwrap();
    expect_err(fs::rename(j("q"), j("q/sub/deep/q")), libc::EINVAL, "into a moved subtree");
    fs::rename(j("t"), j("q/sub/deep/t")).expect("unrelated directory into the subtree");
    assert!(j("q/sub/deep/t").is_dir());
}

#[test]
fn rename_and_renameat2() {
    let c = start();
    on_both(&c, "rename", rename_scenario);
    // Readers on another client see the old or the new file, never no file.
    let other = c.mount_again("second", "");
    rename_race(&c.path("rename"), &other.join("rename"));
}

// ---------------------------------------------------------------------------------------------
// readdir
// ---------------------------------------------------------------------------------------------

fn readdir_scenario(dir: &Path) {
    // Every kind of entry, with its type.
    let small = dir.join("small");
    fs::create_dir(&small).unwrap();
    fs::write(small.join("f"), b"").unwrap();
    fs::create_dir(small.join("d")).unwrap();
    symlink("f", small.join("l")).unwrap();
    mknod(&small.join("p"), libc::S_IFIFO | 0o600, 0).unwrap();
    let mut got: Vec<(String, char)> = fs::read_dir(&small)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            let k = if t.is_dir() {
                'd'
            } else if t.is_symlink() {
                'l'
            } else if t.is_fifo() {
                'p'
            } else if t.is_file() {
                'f'
            } else {
                '?'
            };
            (e.file_name().into_string().unwrap(), k)
        })
        .collect();
    got.sort();
    let want: Vec<(String, char)> =
        [("d", 'd'), ("f", 'f'), ("l", 'l'), ("p", 'p')].into_iter().map(|(n, k)| (n.to_string(), k)).collect();
    assert_eq!(got, want);
    for e in fs::read_dir(&small).unwrap() {
        let e = e.unwrap();
        assert_eq!(std::os::unix::fs::DirEntryExt::ino(&e), meta(&e.path()).ino(), "d_ino of {:?}", e.file_name());
    }
    // An empty directory lists exactly . and ..
    let mut ds = DirStream::open(&small.join("d"));
    let mut names = ds.read_all();
    names.sort();
    assert_eq!(names, [".", ".."]);
    drop(ds);
    expect_err(fs::read_dir(small.join("f")), libc::ENOTDIR, "opendir on a file");

    // rewinddir shows the directory as it is now; seekdir to a telldir position resumes there.
    let mut ds = DirStream::open(&small);
    let mut first = vec![ds.next().unwrap()];
    // A change while the stream is open (it may or may not show in this pass).
    fs::write(small.join("early"), b"").unwrap();
    first.extend(ds.read_all());
    first.retain(|n| n != "early");
    first.sort();
    assert_eq!(first, [".", "..", "d", "f", "l", "p"]);
    // Rewinding in the middle of a listing, after changes, also shows the current state.
    ds.rewind();
    assert!(ds.next().is_some());
    fs::write(small.join("late"), b"").unwrap();
    fs::remove_file(small.join("f")).unwrap();
    ds.rewind();
    let mut again = ds.read_all();
    again.sort();
    assert_eq!(again, [".", "..", "d", "early", "l", "late", "p"], "listing after rewinddir");
    ds.rewind();
    let head = [ds.next().unwrap(), ds.next().unwrap()];
    let pos = ds.tell();
    let rest = ds.read_all();
    assert_eq!(head.len() + rest.len(), 7);
    ds.seek(pos);
    assert_eq!(ds.read_all(), rest, "listing after seekdir");
    drop(ds);

    // 3000 entries listed repeatedly while another thread deletes entries interleaved with
    // them and creates new ones; the listing pauses every 200 entries until the other thread
    // has made more changes. Every entry that exists throughout appears exactly once.
    const N: usize = 3000;
    let big = dir.join("big");
    fs::create_dir(&big).unwrap();
    std::thread::scope(|s| {
        for t in 0..8 {
            let big = &big;
            s.spawn(move || {
                for i in (t..N).step_by(8) {
                    mknod(&big.join(format!("keep-{i:05}")), libc::S_IFREG | 0o644, 0).expect("create");
                    if i % 5 == 0 {
                        mknod(&big.join(format!("tmp-{i:05}")), libc::S_IFREG | 0o644, 0).expect("create");
                    }
                }
            });
        }
    });
    assert_eq!(list(&big).len(), N + N / 5);

    let stop = AtomicBool::new(false);
    let changes = AtomicU64::new(0);
    std::thread::scope(|s| {
        let churn = s.spawn(|| {
            let mut doomed: Vec<usize> = (0..N).step_by(5).collect();
            let mut rng = Rng(77);
            for i in (1..doomed.len()).rev() {
                doomed.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                if let Some(i) = doomed.pop() {
                    fs::remove_file(big.join(format!("tmp-{i:05}"))).unwrap();
                }
                fs::write(big.join(format!("new-{n}")), b"").unwrap();
                if n >= 8 {
                    fs::remove_file(big.join(format!("new-{}", n - 8))).unwrap();
                }
                n += 1;
                changes.store(n, Ordering::Release);
            }
        });
        let wait_for_changes = |since: u64| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while changes.load(Ordering::Acquire) <= since {
                assert!(!churn.is_finished() && Instant::now() < deadline, "the changing thread stopped");
                std::thread::yield_now();
            }
        };
        for pass in 0..4 {
            let mut seen = vec![0u32; N];
            let mut others = std::collections::HashMap::new();
            for (k, e) in fs::read_dir(&big).unwrap().enumerate() {
                if k % 200 == 0 {
                    wait_for_changes(changes.load(Ordering::Acquire));
                }
                let name = e.expect("readdir entry").file_name();
                let name = name.to_str().unwrap();
                if let Some(i) = name.strip_prefix("keep-") {
                    seen[i.parse::<usize>().unwrap()] += 1;
                } else if name.starts_with("tmp-") || name.starts_with("new-") {
                    *others.entry(name.to_string()).or_insert(0u32) += 1;
                } else {
                    panic!("pass {pass}: unexpected entry {name:?}");
                }
            }
            for (i, &k) in seen.iter().enumerate() {
                assert_eq!(k, 1, "pass {pass}: keep-{i:05} listed {k} times");
            }
            for (name, k) in others {
                assert_eq!(k, 1, "pass {pass}: {name} listed {k} times");
            }
        }
        stop.store(true, Ordering::Release);
    });
    assert!(changes.load(Ordering::Acquire) >= 4 * (N / 200) as u64);
}

#[test]
fn readdir_complete_and_stable_under_concurrent_changes() {
    let c = start();
    on_both(&c, "readdir", readdir_scenario);
}

// ---------------------------------------------------------------------------------------------
// statfs, xattrs, access, fallocate
// ---------------------------------------------------------------------------------------------

fn xattr_scenario(dir: &Path) {
    let f = dir.join("f");
    fs::write(&f, b"").unwrap();
    setxattr(&f, "user.color", b"blue", 0).expect("setxattr");
    assert_eq!(xattr(&f, "user.color").unwrap(), b"blue");
    assert_eq!(getxattr(&f, "user.color", 0).unwrap().0, 4, "size query");
    expect_err(getxattr(&f, "user.color", 2), libc::ERANGE, "getxattr with a small buffer");
    assert_eq!(getxattr(&f, "user.color", 4).unwrap(), (4, b"blue".to_vec()), "exact-size buffer");
    expect_err(
        setxattr(&f, "user.color", b"red", libc::XATTR_CREATE),
        libc::EEXIST,
        "XATTR_CREATE on an existing name",
    );
    assert_eq!(xattr(&f, "user.color").unwrap(), b"blue");
    expect_err(setxattr(&f, "user.none", b"x", libc::XATTR_REPLACE), libc::ENODATA, "XATTR_REPLACE on a missing name");
    expect_err(getxattr(&f, "user.none", 0), libc::ENODATA, "getxattr missing (size query)");
    expect_err(getxattr(&f, "user.none", 100), libc::ENODATA, "getxattr missing");
    setxattr(&f, "user.color", b"green!", libc::XATTR_REPLACE).expect("XATTR_REPLACE");
    assert_eq!(xattr(&f, "user.color").unwrap(), b"green!");
    setxattr(&f, "user.new", b"n", libc::XATTR_CREATE).expect("XATTR_CREATE new");
    setxattr(&f, "user.empty", b"", 0).expect("empty value");
    assert_eq!(getxattr(&f, "user.empty", 0).unwrap().0, 0);
    assert_eq!(getxattr(&f, "user.empty", 10).unwrap(), (0, vec![]));
    let bin: Vec<u8> = (0..=255u8).rev().collect();
    setxattr(&f, "user.bin", &bin, 0).unwrap();
    assert_eq!(xattr(&f, "user.bin").unwrap(), bin);

    assert_eq!(user_xattrs(&f), ["user.bin", "user.color", "user.empty", "user.new"]);
    expect_err(listxattr(&f, 1), libc::ERANGE, "listxattr with a small buffer");
    removexattr(&f, "user.color").expect("removexattr");
    expect_err(removexattr(&f, "user.color"), libc::ENODATA, "removexattr missing");
    expect_err(getxattr(&f, "user.color", 100), libc::ENODATA, "removed xattr");
    assert_eq!(user_xattrs(&f), ["user.bin", "user.empty", "user.new"]);

    // Directories carry xattrs too; symlinks may not have user.* ones.
    let d = dir.join("d");
    fs::create_dir(&d).unwrap();
    setxattr(&d, "user.dir", b"yes", 0).unwrap();
    assert_eq!(xattr(&d, "user.dir").unwrap(), b"yes");
    symlink("f", dir.join("l")).unwrap();
    expect_err(lsetxattr(&dir.join("l"), "user.x", b"1"), libc::EPERM, "user xattr on a symlink");
    // Through a symlink, the target gets it.
    setxattr(&dir.join("l"), "user.via", b"link", 0).unwrap();
    assert_eq!(xattr(&f, "user.via").unwrap(), b"link");

    expect_err(setxattr(&dir.join("missing"), "user.x", b"1", 0), libc::ENOENT, "setxattr on a missing file");
    let long_name = format!("user.{}", "n".repeat(250));
    setxattr(&f, &long_name, b"v", 0).expect("255-byte xattr name");
    assert_eq!(xattr(&f, &long_name).unwrap(), b"v");
    expect_err(setxattr(&f, &format!("{long_name}n"), b"v", 0), libc::ERANGE, "256-byte xattr name");
    expect_err(setxattr(&f, "user.bad", b"v", 0x40), libc::EINVAL, "unknown setxattr flag");

    // The xattrs go away with the file.
    let g = dir.join("g");
    fs::write(&g, b"").unwrap();
    setxattr(&g, "user.old", b"1", 0).unwrap();
    fs::remove_file(&g).unwrap();
    fs::write(&g, b"").unwrap();
    assert!(user_xattrs(&g).is_empty(), "a new file has no xattrs");
}

fn access_scenario(dir: &Path) {
    let f = dir.join("f");
    fs::write(&f, b"").unwrap();
    access(&f, libc::F_OK).expect("F_OK");
    expect_err(access(&dir.join("missing"), libc::F_OK), libc::ENOENT, "F_OK missing");
    expect_err(access(&f.join("x"), libc::F_OK), libc::ENOTDIR, "below a file");
    chmod(&f, 0o644);
    access(&f, libc::R_OK | libc::W_OK).expect("root may read and write");
    expect_err(access(&f, libc::X_OK), libc::EACCES, "X_OK without any execute bit");
    chmod(&f, 0o744);
    access(&f, libc::X_OK).expect("X_OK with u+x");
    chmod(&f, 0o001);
    access(&f, libc::X_OK).expect("X_OK with o+x (root)");
    chmod(&f, 0);
    access(&f, libc::R_OK | libc::W_OK).expect("root ignores missing r/w bits");
    expect_err(access(&f, libc::X_OK), libc::EACCES, "X_OK on mode 000");
    let d = dir.join("d");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0);
    access(&d, libc::R_OK | libc::W_OK | libc::X_OK).expect("root may search any directory");
    chmod(&d, 0o755);
}

fn fallocate_scenario(dir: &Path) {
    let p = dir.join("f");
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
    fallocate(&f, 0, 0, MIB).expect("fallocate mode 0");
    assert_eq!(f.metadata().unwrap().len(), MIB);
    assert!(is_zero(&read(&p)));
    fallocate(&f, 0, 3 * MIB, MIB).expect("fallocate past EOF");
    assert_eq!(f.metadata().unwrap().len(), 4 * MIB);
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 4 * MIB, 2 * MIB).expect("KEEP_SIZE");
    assert_eq!(f.metadata().unwrap().len(), 4 * MIB, "KEEP_SIZE changed the size");
    assert_eq!(meta(&p).len(), 4 * MIB);
    assert!(is_zero(&read(&p)));

    let data = pattern(9, (4 * MIB) as usize);
    f.write_all_at(&data, 0).unwrap();
    // Allocating inside the file keeps the data.
    fallocate(&f, 0, 100, 200).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 4 * MIB);
    assert_bytes(&read(&p), &data, "after fallocate over data");

    let (off, len) = (MIB + 5, 100_000u64);
    fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len).expect("punch hole");
    assert_eq!(f.metadata().unwrap().len(), 4 * MIB, "punch changed the size");
    let mut want = data.clone();
    want[off as usize..(off + len) as usize].fill(0);
    assert_bytes(&read(&p), &want, "after punching a hole");
    assert_bytes(&read_at(&f, 0, want.len()), &want, "punched, same fd");
    // A hole reaching past EOF.
    fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 4 * MIB - 10, MIB).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 4 * MIB);
    let n = want.len();
    want[n - 10..].fill(0);
    assert_bytes(&read(&p), &want, "after punching the tail");
    // Zero range.
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 2 * MIB, 10).expect("zero range");
    want[(2 * MIB) as usize..][..10].fill(0);
    assert_bytes(&read(&p), &want, "after zeroing a range");

    expect_err(fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE, 0, 10), libc::EOPNOTSUPP, "punch hole without KEEP_SIZE");
    expect_err(fallocate(&f, 0, 0, 0), libc::EINVAL, "zero length");
    let ro = File::open(&p).unwrap();
    expect_err(fallocate(&ro, 0, 0, 10), libc::EBADF, "read-only descriptor");
}

#[test]
fn statfs_xattr_access_fallocate() {
    let c = start();

    let s = statvfs(&c.mnt);
    assert!(s.f_blocks > 0, "statfs reports no capacity");
    assert!(s.f_bsize > 0 && s.f_frsize > 0);
    assert!(s.f_bfree <= s.f_blocks && s.f_bavail <= s.f_blocks);
    assert!(s.f_files > 0 && s.f_ffree <= s.f_files);
    assert_eq!(s.f_namemax, 255);
    // SAFETY: zeroed is a valid statfs; the call fills it.
    let mut sf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    cvt(unsafe { libc::statfs(cpath(&c.mnt).as_ptr(), &mut sf) }).expect("statfs");
    assert!(sf.f_blocks > 0);
    assert_eq!(sf.f_namelen, 255);

    on_both(&c, "xattr", xattr_scenario);
    on_both(&c, "access", access_scenario);
    on_both(&c, "fallocate", fallocate_scenario);
    same_through_second_client(&c, &["fallocate/f"]);

    // Limits only Cairn is measured against (ext4 keeps xattrs within one block): a 64 KiB
    // value is the largest Linux allows.
    let f = c.path("bigx");
    fs::write(&f, b"").unwrap();
    let value = pattern(7, 65536);
    setxattr(&f, "user.big", &value, 0).expect("64 KiB xattr value");
    assert_eq!(getxattr(&f, "user.big", 0).unwrap().0, 65536);
    assert_eq!(xattr(&f, "user.big").unwrap(), value);
    expect_err(getxattr(&f, "user.big", 65535), libc::ERANGE, "64 KiB value, buffer one byte short");
    let e = setxattr(&f, "user.bigger", &pattern(8, 65537), 0).expect_err("a value over 64 KiB must be refused");
    assert!(matches!(e.raw_os_error(), Some(libc::E2BIG) | Some(libc::ERANGE)), "value over 64 KiB: {e}");
    expect_err(getxattr(&f, "user.bigger", 0), libc::ENODATA, "refused value is not stored");

    // SELinux labels are refused as on a filesystem without them (ls -l then stops asking for
    // them); other security.* names are kept.
    let name = "security.selinux";
    expect_err(getxattr(&f, name, 100), libc::EOPNOTSUPP, "getxattr security.selinux");
    expect_err(setxattr(&f, name, b"system_u:object_r:tmp_t:s0", 0), libc::EOPNOTSUPP, "setxattr security.selinux");
    expect_err(removexattr(&f, name), libc::EOPNOTSUPP, "removexattr security.selinux");
    setxattr(&f, "security.test", b"kept", 0).expect("another security.* xattr");
    assert_eq!(xattr(&f, "security.test").unwrap(), b"kept");
}

// ---------------------------------------------------------------------------------------------
// names
// ---------------------------------------------------------------------------------------------

fn names_scenario(dir: &Path) {
    // 255 bytes with control characters, 0xff, spaces and newlines (anything but '/' and NUL).
    let mut name: Vec<u8> = b"\x01 \n\xff\t".to_vec();
    name.extend((1..=255u8).filter(|&b| b != b'/'));
    name.truncate(255);
    assert_eq!(name.len(), 255);
    let mut other = name.clone();
    other.reverse();
    let p = dir.join(OsStr::from_bytes(&name));
    fs::write(&p, b"odd").expect("create a 255-byte name");
    assert_eq!(read(&p), b"odd");
    assert!(list(dir).contains(&name), "readdir returns the exact bytes");
    let q = dir.join(OsStr::from_bytes(&other));
    fs::rename(&p, &q).expect("rename to a 255-byte name");
    assert_eq!(list(dir), vec![other.clone()]);
    fs::hard_link(&q, &p).expect("link with a 255-byte name");
    assert_eq!(nlink(&p), 2);
    fs::remove_file(&p).unwrap();
    let sd = dir.join(OsStr::from_bytes(&name));
    fs::create_dir(&sd).expect("mkdir with a 255-byte name");
    symlink(OsStr::from_bytes(&other), sd.join(OsStr::from_bytes(&name))).expect("symlink with a 255-byte name");
    assert_eq!(fs::read_link(sd.join(OsStr::from_bytes(&name))).unwrap().as_os_str().as_bytes(), &other[..]);
    assert_eq!(list(&sd), vec![name.clone()]);

    // 256 bytes: ENAMETOOLONG everywhere.
    let long = dir.join("x".repeat(256));
    expect_err(File::create(&long), libc::ENAMETOOLONG, "create 256");
    expect_err(File::open(&long), libc::ENAMETOOLONG, "open 256");
    expect_err(fs::metadata(&long), libc::ENAMETOOLONG, "stat 256");
    expect_err(fs::create_dir(&long), libc::ENAMETOOLONG, "mkdir 256");
    expect_err(fs::rename(&q, &long), libc::ENAMETOOLONG, "rename to 256");
    expect_err(fs::hard_link(&q, &long), libc::ENAMETOOLONG, "link 256");
    expect_err(symlink("t", &long), libc::ENAMETOOLONG, "symlink 256");
    expect_err(mknod(&long, libc::S_IFIFO | 0o600, 0), libc::ENAMETOOLONG, "mknod 256");
    expect_err(fs::remove_file(&long), libc::ENAMETOOLONG, "unlink 256");
    expect_err(fs::remove_dir(&long), libc::ENAMETOOLONG, "rmdir 256");
    assert!(q.exists(), "failed renames leave the source");
}

#[test]
fn names_up_to_255_bytes() {
    let c = start();
    on_both(&c, "names", names_scenario);
}

// ---------------------------------------------------------------------------------------------
// unlinked files stay usable through open descriptors
// ---------------------------------------------------------------------------------------------

fn unlinked_scenario(dir: &Path) {
    let p = dir.join("doomed");
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
    f.write_all_at(b"still here", 0).unwrap();
    fs::remove_file(&p).unwrap();
    expect_err(fs::metadata(&p), libc::ENOENT, "stat after unlink");
    assert!(list(dir).is_empty());
    assert_eq!(f.metadata().unwrap().nlink(), 0, "fstat nlink after unlink");
    f.write_all_at(b"!", 10).unwrap();
    assert_eq!(read_at(&f, 0, 100), b"still here!");
    f.sync_all().expect("fsync of an unlinked file");
    assert_eq!(f.metadata().unwrap().len(), 11);
    f.set_len(5).unwrap();
    assert_eq!(read_at(&f, 0, 100), b"still");
    // A second descriptor opened through /proc keeps it alive after the first one closes.
    let again = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .expect("reopen an unlinked file");
    drop(f);
    again.write_all_at(b"!", 5).unwrap();
    assert_eq!(read_at(&again, 0, 100), b"still!");
    // A new file under the old name is a different, empty file.
    fs::write(&p, b"new").unwrap();
    assert_ne!(meta(&p).ino(), again.metadata().unwrap().ino());
    assert_eq!(read_at(&again, 0, 100), b"still!");
    drop(again);
    assert_eq!(read(&p), b"new");
}

/// Inodes in use in the volume, as statfs reports them.
fn used_inodes(c: &Cluster) -> u64 {
    let s = statvfs(&c.mnt);
    s.f_files - s.f_ffree
}

/// Distinct inodes reachable from `root`, itself included.
fn reachable_inodes(root: &Path) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = meta(&p);
        if seen.insert(m.ino()) && m.is_dir() {
            todo.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    seen.len() as u64
}

/// Waits (bounded) until the volume uses `want` inodes: the kernel sends RELEASE after close
/// returns, and the metadata server frees an unlinked file 5 s after the last close.
fn wait_used_inodes(c: &Cluster, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let used = used_inodes(c);
        if used == want {
            return;
        }
        assert!(Instant::now() < deadline, "volume still uses {used} inodes, want {want}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unlinked_file_lives_until_last_close() {
    let c = start();
    on_both(&c, "unlinked", unlinked_scenario);

    // After the last close the inode and its data are freed. Start from a volume whose every
    // inode is reachable (the scenario's unlinked file is freed after its RELEASE arrives).
    let base = reachable_inodes(&c.mnt);
    wait_used_inodes(&c, base);
    let p = c.path("gone");
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
    f.write_all_at(&pattern(5, 3 * MIB as usize), 0).unwrap();
    f.sync_all().unwrap();
    assert_eq!(used_inodes(&c), base + 1);
    fs::remove_file(&p).unwrap();
    assert_eq!(used_inodes(&c), base + 1, "an open unlinked file is kept");
    assert_bytes(&read_at(&f, 0, 3 * MIB as usize), &pattern(5, 3 * MIB as usize), "unlinked file data");
    drop(f);
    wait_used_inodes(&c, base);
}
