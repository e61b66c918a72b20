//! Bugs that xfstests, pjdfstest and fsx found, checked here again so CI catches them without
//! those suites (see xfstests/RESULTS.md).

use cairn_tests::*;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

fn atime(p: &std::path::Path) -> SystemTime {
    std::fs::metadata(p).unwrap().accessed().unwrap()
}

/// Sleeps past the next whole second, so a new timestamp differs from an old one.
fn tick() {
    std::thread::sleep(Duration::from_millis(1100));
}

/// generic/003: the kernel leaves atime to FUSE filesystems; reads must update it by the
/// mount's rule (relatime by default, strictatime, noatime).
#[test]
fn reads_update_atime_by_the_mount_rule() {
    let c = Cluster::start(1);
    let f = c.path("f");
    std::fs::write(&f, b"data").unwrap();
    let created = atime(&f);
    tick();
    std::fs::read(&f).unwrap();
    let first = atime(&f);
    assert!(first > created, "relatime: the first read after a write updates atime");
    tick();
    std::fs::read(&f).unwrap();
    assert_eq!(atime(&f), first, "relatime: a second read does not");

    let strict = c.mount_again("strict", "strictatime");
    tick();
    std::fs::read(strict.join("f")).unwrap();
    let second = atime(&strict.join("f"));
    assert!(second > first, "strictatime: every read updates atime");

    let noatime = c.mount_again("noatime", "noatime");
    std::fs::write(noatime.join("g"), b"data").unwrap();
    let g_created = atime(&noatime.join("g"));
    tick();
    std::fs::read(noatime.join("g")).unwrap();
    assert_eq!(atime(&noatime.join("g")), g_created, "noatime: reads leave atime alone");

    // A listing is a read of the directory (diratime is the default).
    let d = c.path("d");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("x"), b"").unwrap();
    let before = atime(&d);
    tick();
    std::fs::read_dir(&d).unwrap().for_each(drop);
    assert!(atime(&d) > before, "relatime: listing a directory after a change updates its atime");
}

/// generic/184, 306, 434: mount(8) drops `dev` and `suid` from helper options because they
/// are its defaults for root; FUSE's default is the opposite, so the helper must ask for them.
#[test]
fn root_mounts_allow_devices_and_suid_unless_told_otherwise() {
    let c = Cluster::start(1);
    let options = |dir: &std::path::Path| {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let want = dir.to_string_lossy().to_string();
        mounts.lines().find(|l| l.split(' ').nth(1) == Some(&want)).unwrap().split(' ').nth(3).unwrap().to_string()
    };
    let plain = c.mount_again("plain", "");
    let o = options(&plain);
    assert!(!o.contains("nodev") && !o.contains("nosuid"), "{o}");
    let strict = c.mount_again("strict", "nodev,nosuid");
    let o = options(&strict);
    assert!(o.contains("nodev") && o.contains("nosuid"), "{o}");
}

/// fsx: every flushed write becomes a slice, so thousands of small writes left a chunk map
/// that every read had to fetch and resolve whole (fsx slowed to a crawl). Compaction must
/// bound the map and never change a byte, with reads, fsyncs and truncates in between.
#[test]
fn many_small_writes_are_compacted_without_changing_a_byte() {
    let c = Cluster::start(1);
    let path = c.path("db");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    let mut model = vec![0u8; 0];
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    const SPAN: u64 = 1 << 20;
    const WRITES: u64 = 2000;
    for i in 0..WRITES {
        let off = next(SPAN);
        let len = 1 + next(3000);
        let byte = (i % 251) as u8 + 1;
        let buf = vec![byte; len as usize];
        f.write_all_at(&buf, off).unwrap();
        let end = (off + len) as usize;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].fill(byte);
        if i % 10 == 9 {
            let at = next(model.len() as u64);
            let mut got = vec![0u8; 4096.min(model.len() - at as usize)];
            f.read_exact_at(&mut got, at).unwrap();
            assert_eq!(got, model[at as usize..at as usize + got.len()], "read after write {i} at {at}");
        }
        if i % 500 == 499 {
            f.sync_all().unwrap();
        }
        if i == WRITES / 2 {
            let keep = model.len() as u64 * 3 / 4;
            f.set_len(keep).unwrap();
            model.truncate(keep as usize);
        }
    }
    f.sync_all().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), model);

    // Compaction runs in the background after a read finds a long map; wait for it.
    let count = || {
        let out = Command::new("sqlite3")
            .arg("-readonly")
            .arg(c.data.join("meta.db"))
            .arg("SELECT COUNT(*) FROM slices")
            .output()
            .expect("sqlite3 (apt-get install sqlite3)");
        String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count() > 200 && Instant::now() < deadline {
        std::fs::read(&path).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(count() <= 200, "{} slices left after {WRITES} writes", count());
    assert_eq!(std::fs::read(&path).unwrap(), model);
    // Read through a second client too: nothing it caches comes from the writer.
    let other = c.mount_again("other", "");
    assert_eq!(std::fs::read(other.join("db")).unwrap(), model, "through a second client");
}

/// generic/426, 467, 477, 756, 777: a file handle (name_to_handle_at) must open the file again
/// after the kernel dropped the inode from its caches, and give ESTALE once it is deleted.
#[test]
fn file_handles_survive_cache_drops_and_go_stale_on_delete() {
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        data: [u8; 128],
    }
    let c = Cluster::start(1);
    let f = c.path("f");
    std::fs::write(&f, b"handle").unwrap();
    let mut h = Handle { bytes: 128, kind: 0, data: [0; 128] };
    let mut mount_id = 0;
    // SAFETY: `h` is a file_handle with room for 128 bytes, as handle_bytes says.
    let r =
        unsafe { libc::name_to_handle_at(libc::AT_FDCWD, cpath(&f).as_ptr(), (&raw mut h).cast(), &mut mount_id, 0) };
    assert_eq!(r, 0, "name_to_handle_at: errno {}", errno());
    let mnt = std::fs::File::open(&c.mnt).unwrap();
    let reopen = |h: &mut Handle| {
        std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        // SAFETY: `h` was filled by name_to_handle_at; the returned fd is closed below.
        let fd = unsafe {
            libc::open_by_handle_at(std::os::fd::AsRawFd::as_raw_fd(&mnt), (h as *mut Handle).cast(), libc::O_RDONLY)
        };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let mut file: std::fs::File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        let mut s = String::new();
        std::io::Read::read_to_string(&mut file, &mut s).unwrap();
        Ok(s)
    };
    assert_eq!(reopen(&mut h), Ok("handle".to_string()));
    std::fs::remove_file(&f).unwrap();
    assert_eq!(reopen(&mut h), Err(libc::ESTALE));
}
