//! Lookups answered from a cached directory listing (crates/client/src/listing.rs) must show
//! this client's own changes at once, and another client's within the cache TTL.

use cairn_tests::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// Makes the kernel forget dentries and inodes, so the next path walk asks the filesystem
/// (callers hold [`page_cache_to_myself`]: this empties every mount's caches).
fn forget_dentries() {
    std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
}

/// Writes `data` to a new file at `path` and fsyncs it, so its commit is answered on return.
fn write_synced(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    std::io::Write::write_all(&mut f, data).unwrap();
    f.sync_all().unwrap();
}

fn stat_all(dir: &Path, n: usize) {
    for i in 0..n {
        std::fs::symlink_metadata(dir.join(format!("f{i}"))).unwrap();
    }
}

#[test]
fn listed_lookups_show_this_clients_changes_at_once() {
    let _caches = page_cache_to_myself();
    let c = Cluster::start(1);
    let d = c.path("d");
    std::fs::create_dir(&d).unwrap();
    for i in 0..20 {
        std::fs::write(d.join(format!("f{i}")), b"x").unwrap();
    }
    forget_dentries();
    // Enough lookups in one directory to make the client list it whole.
    stat_all(&d, 20);

    std::fs::set_permissions(d.join("f1"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(d.join("f2"), b"longer now").unwrap();
    std::fs::remove_file(d.join("f3")).unwrap();
    std::fs::rename(d.join("f4"), d.join("f4b")).unwrap();
    std::fs::rename(d.join("f6"), d.join("f7")).unwrap();
    std::fs::write(d.join("new"), b"new").unwrap();
    std::fs::hard_link(d.join("f5"), d.join("f5l")).unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    let f8 = d.join("f8");
    let f8_ino = std::fs::metadata(&f8).unwrap().ino();
    forget_dentries();

    let meta = |name: &str| std::fs::symlink_metadata(d.join(name));
    assert_eq!(meta("f1").unwrap().permissions().mode() & 0o777, 0o600, "chmod");
    assert_eq!(meta("f2").unwrap().len(), 10, "write");
    assert_eq!(meta("f3").unwrap_err().kind(), std::io::ErrorKind::NotFound, "unlink");
    assert_eq!(meta("f4").unwrap_err().kind(), std::io::ErrorKind::NotFound, "rename source");
    assert_eq!(meta("f4b").unwrap().len(), 1, "rename target");
    assert_eq!(meta("f6").unwrap_err().kind(), std::io::ErrorKind::NotFound, "rename over: source");
    assert_eq!(std::fs::read(d.join("f7")).unwrap(), b"x", "rename over: target");
    assert_eq!(meta("new").unwrap().len(), 3, "create");
    assert_eq!(meta("f5").unwrap().nlink(), 2, "link: source");
    assert_eq!(meta("f5l").unwrap().nlink(), 2, "link: new name");
    assert!(meta("sub").unwrap().is_dir(), "mkdir");
    assert_eq!(meta("f8").unwrap().ino(), f8_ino, "untouched entry");
    assert_eq!(meta("missing").unwrap_err().kind(), std::io::ErrorKind::NotFound);
    // A name created over a negative entry the listing held.
    std::fs::write(d.join("missing"), b"now").unwrap();
    forget_dentries();
    assert_eq!(meta("missing").unwrap().len(), 3, "created after a miss");
}

#[test]
fn another_clients_changes_show_within_the_cache_ttl() {
    let c = Cluster::start(1);
    let other = c.mount_again("other", "");
    let d = c.path("d");
    std::fs::create_dir(&d).unwrap();
    for i in 0..20 {
        std::fs::write(d.join(format!("f{i}")), b"x").unwrap();
    }
    let od = other.join("d");
    stat_all(&od, 20);
    std::fs::remove_file(d.join("f0")).unwrap();
    std::fs::write(d.join("late"), b"late").unwrap();
    // A recall makes this immediate; the deadline allows slack for a loaded machine, but far
    // less than a listing kept past its lifetime would take.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let gone = std::fs::symlink_metadata(od.join("f0")).is_err();
        let there = std::fs::symlink_metadata(od.join("late")).is_ok();
        if gone && there {
            break;
        }
        assert!(Instant::now() < deadline, "other client: f0 gone {gone}, late there {there}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `fstatat` of `name` in the directory open as `dir`: the errno, or 0 if it exists. Relative
/// to an open directory, so the kernel looks up only `name`, never the directory's own path.
fn stat_at(dir: &std::fs::File, name: &str) -> i32 {
    stat_in(dir, name).err().unwrap_or(0)
}

/// `fstatat` of `name` in the directory open as `dir`, or the errno.
fn stat_in(dir: &std::fs::File, name: &str) -> Result<libc::stat, i32> {
    use std::os::fd::AsRawFd;
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid descriptor, a NUL-terminated name and a stat buffer of the right type.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    match unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } {
        0 => Ok(st),
        _ => Err(errno()),
    }
}

#[test]
fn names_missing_from_a_directory_just_made_are_answered_locally_until_another_client_adds_one() {
    let c = Cluster::start(1);
    let other = c.mount_again("other", "");
    std::fs::create_dir(c.path("new")).unwrap();
    let dir = std::fs::File::open(c.path("new")).unwrap();
    let asked = || request_count(&c.mnt, |n| matches!(n, "meta.Lookup" | "meta.ReadDir"));
    let before = asked();
    for i in 0..10 {
        assert_eq!(stat_at(&dir, &format!("m{i}")), libc::ENOENT);
    }
    assert_eq!(asked(), before, "misses in a directory this client just made went to the server");

    // Another client adds names: the lease on the new directory is recalled, and the next
    // lookup here finds them, also over the kernel's negative entry for one of them.
    std::fs::write(other.join("new/m0"), b"other").unwrap();
    std::fs::write(other.join("new/x"), b"x").unwrap();
    assert_eq!(stat_at(&dir, "m0"), 0, "a name another client created over a miss");
    assert_eq!(stat_at(&dir, "x"), 0, "a name another client created");
    assert_eq!(std::fs::read(c.path("new/m0")).unwrap(), b"other");
    assert_eq!(stat_at(&dir, "m1"), libc::ENOENT);
    umount_lazy(&other);
}

#[test]
fn files_written_since_their_directory_was_listed_are_answered_with_their_new_attributes() {
    let _caches = page_cache_to_myself();
    let c = Cluster::start(1);
    let d = c.path("new");
    std::fs::create_dir(&d).unwrap();
    for i in 0..20 {
        // Synced, so every commit is answered before the lookups (a commit still in flight
        // after a plain close is rightly asked about).
        write_synced(&d.join(format!("f{i}")), format!("file {i}").as_bytes());
    }
    // Held open, the directory stays in the kernel's cache: only its entries are looked up.
    let dir = std::fs::File::open(&d).unwrap();
    forget_dentries();
    let lookups = || request_count(&c.mnt, |n| ["meta.Lookup", "meta.ReadDir", "meta.GetAttr"].contains(&n));
    let before = lookups();
    for i in 0..20 {
        let st = stat_in(&dir, &format!("f{i}")).unwrap();
        assert_eq!(st.st_size, format!("file {i}").len() as i64, "size of f{i} after its write");
    }
    assert_eq!(lookups(), before, "names this client created and wrote were looked up on the server");
}

#[test]
fn a_directory_this_client_filled_is_read_from_its_listing_until_another_client_changes_it() {
    let c = Cluster::start(1);
    let d = c.path("made");
    std::fs::create_dir(&d).unwrap();
    // More than one reply's worth of entries (256), so the kernel continues the listing.
    let mut expected: Vec<(String, u64)> = (0..300).map(|i| (format!("f{i}"), 10 + i % 7)).collect();
    for (name, len) in &expected {
        write_synced(&d.join(name), &vec![b'x'; *len as usize]);
    }
    std::fs::create_dir(d.join("sub")).unwrap();
    expected.push(("sub".into(), std::fs::metadata(d.join("sub")).unwrap().len()));
    expected.sort();
    let read_dirs = || request_count(&c.mnt, |n| n == "meta.ReadDir");
    let list = |dir: &Path| {
        let mut seen: Vec<(String, u64)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().into_string().unwrap(), e.metadata().unwrap().len())
            })
            .collect();
        seen.sort();
        seen
    };
    let before = read_dirs();
    assert_eq!(list(&d), expected, "names and sizes");
    assert_eq!(read_dirs(), before, "the listing this client made was asked of the server");

    let other = c.mount_again("other", "");
    std::fs::write(other.join("made/from-other"), b"o").unwrap();
    expected.push(("from-other".into(), 1));
    expected.sort();
    assert_eq!(list(&d), expected, "another client's new file");
    umount_lazy(&other);
}

#[test]
fn a_long_listing_read_page_by_page_shows_every_entry_once_while_another_client_changes_it() {
    let c = Cluster::start(1);
    let d = c.path("big");
    std::fs::create_dir(&d).unwrap();
    // Over two of the client's 1,024-entry pages, made by another client, so B pages from
    // the server (fetching each next page ahead) instead of answering from a listing.
    const N: usize = 2500;
    for i in 0..N {
        std::fs::File::create(d.join(format!("keep-{i:05}"))).unwrap();
    }
    std::fs::File::create(d.join("doomed")).unwrap();
    let b = c.mount_again("b", "");
    let mut seen = vec![0u32; N];
    let (mut doomed, mut new) = (0, 0);
    for (k, e) in std::fs::read_dir(b.join("big")).unwrap().enumerate() {
        if k == 1100 {
            // A changes the directory after B fetched its second page: the page B fetched
            // ahead meanwhile may be stale, and B must neither lose nor repeat entries.
            std::fs::remove_file(d.join("doomed")).unwrap();
            std::fs::File::create(d.join("new")).unwrap();
            std::fs::set_permissions(d.join("keep-02400"), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        // Stat each entry, as `ls -l` does, so the kernel keeps asking for readdirplus pages.
        let e = e.unwrap();
        e.metadata().unwrap();
        let name = e.file_name().into_string().unwrap();
        match name.strip_prefix("keep-") {
            Some(i) => seen[i.parse::<usize>().unwrap()] += 1,
            None if name == "doomed" => doomed += 1,
            None if name == "new" => new += 1,
            None => panic!("unexpected entry {name}"),
        }
    }
    assert!(seen.iter().all(|&n| n == 1), "every entry listed once: {:?}", seen.iter().position(|&n| n != 1));
    assert!(doomed <= 1 && new <= 1, "a changed entry at most once");
    let mode = std::fs::symlink_metadata(b.join("big/keep-02400")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "attributes from a page read before the chmod");
    let mut names: Vec<_> = std::fs::read_dir(b.join("big")).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names.len(), N + 1, "the next listing shows the changes");
    assert_eq!(names.last().unwrap(), "new");
    umount_lazy(&b);
}

#[test]
fn walking_a_tree_after_a_remount_reads_each_directory_once() {
    let _caches = page_cache_to_myself();
    let c = Cluster::start(1);
    sh(&c.mnt, "for d in a a/b a/b/c e f; do mkdir -p t/$d; for i in 1 2 3; do echo $i > t/$d/f$i; done; done");
    c.down();
    c.up(1, &[]);
    std::fs::metadata(c.path("t")).unwrap();
    let count = |kind: &str| request_count(&c.mnt, |n| n == format!("meta.{kind}"));
    let (readdirs, getattrs) = (count("ReadDir"), count("GetAttr"));
    // `find` lists each of the 6 directories (the kernel ends each listing with a plain
    // READDIR after a READDIRPLUS) and stats what it finds.
    let found = sh(&c.mnt, "find t | wc -l");
    assert_eq!(found.trim(), "21", "6 directories and 15 files");
    assert_eq!(count("ReadDir") - readdirs, 6, "one ReadDir per directory");
    assert_eq!(count("GetAttr") - getattrs, 0, "a directory's attributes come with its parent's listing");
    // Once the walk went down into `a`, the directories it enters next (`a/b`, `e`, `f`,
    // then `a/b/c`) were listed ahead of it: those ReadDirs are among the 6.
    let ahead = request_count(&c.mnt, |n| n == "walk.ahead");
    assert!(ahead >= 3, "{ahead} directories listed ahead of the walk");
}
