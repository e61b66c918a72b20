//! Two clients (separate mount processes) on one volume: a change made through one is seen
//! by the other at once, with no sleep in between, although both cache attributes, names
//! (also negative ones) and listings; the metadata server recalls what the other cached
//! before it answers the change.

use cairn_tests::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn changes_through_one_client_are_seen_at_once_through_another() {
    let c = Cluster::start(1);
    let (a, b) = (c.mnt.clone(), c.mount_again("b", ""));
    std::fs::create_dir(a.join("d")).unwrap();
    std::fs::write(a.join("d/f"), b"one").unwrap();
    for round in 0..10u32 {
        // B caches the file's attributes, the listing, and a miss; then A changes all three.
        let new_mode = if round % 2 == 0 { 0o600 } else { 0o644 };
        let _ = mode(&b.join("d/f"));
        let before = names(&b.join("d"));
        let fresh = format!("new{round}");
        assert!(std::fs::metadata(b.join("d").join(&fresh)).is_err());

        std::fs::set_permissions(a.join("d/f"), std::fs::Permissions::from_mode(new_mode)).unwrap();
        assert_eq!(mode(&b.join("d/f")), new_mode, "round {round}: chmod on A, stat on B");

        std::fs::write(a.join("d").join(&fresh), b"x").unwrap();
        assert!(std::fs::metadata(b.join("d").join(&fresh)).is_ok(), "round {round}: create on A, stat on B");
        let mut want = before.clone();
        want.push(fresh.clone());
        want.sort();
        assert_eq!(names(&b.join("d")), want, "round {round}: create on A, ls on B");

        std::fs::rename(a.join("d").join(&fresh), a.join(format!("moved{round}"))).unwrap();
        assert!(std::fs::metadata(b.join("d").join(&fresh)).is_err(), "round {round}: rename on A, old name on B");
        assert!(
            std::fs::metadata(b.join(format!("moved{round}"))).is_ok(),
            "round {round}: rename on A, new name on B"
        );
        assert_eq!(names(&b.join("d")), before, "round {round}: rename on A, ls on B");

        std::fs::remove_file(a.join(format!("moved{round}"))).unwrap();
        assert!(std::fs::metadata(b.join(format!("moved{round}"))).is_err(), "round {round}: unlink on A, stat on B");

        // Data written and closed on A is read by B at once, also after B read the old data.
        let text = format!("round {round} from A");
        assert!(!std::fs::read(b.join("d/f")).unwrap().is_empty());
        std::fs::write(a.join("d/f"), &text).unwrap();
        assert_eq!(std::fs::read_to_string(b.join("d/f")).unwrap(), text, "round {round}: write on A, read on B");
    }
    // Unlinking one of two names changes the link count seen through the other.
    std::fs::hard_link(a.join("d/f"), a.join("d/h")).unwrap();
    let nlink = |p: &Path| std::os::unix::fs::MetadataExt::nlink(&std::fs::metadata(p).unwrap());
    assert_eq!(nlink(&b.join("d/h")), 2);
    std::fs::remove_file(a.join("d/f")).unwrap();
    assert_eq!(nlink(&b.join("d/h")), 1, "unlink on A, link count through the other name on B");
    let stats = run(std::process::Command::new(bin("cairn")).arg("stats").arg(&b));
    assert!(stats.lines().any(|l| l.starts_with("callback.Recall")), "B was never recalled:\n{stats}");
    umount_lazy(&b);
}

#[test]
fn a_stopped_client_delays_changes_only_until_its_leases_end() {
    let c = Cluster::start(1);
    let (b, b_pid) = c.mount_again_with_pid("b");
    std::fs::write(c.path("f"), b"x").unwrap();
    let _ = mode(&b.join("f"));
    // SAFETY: stopping and continuing a process this test started.
    unsafe { libc::kill(b_pid, libc::SIGSTOP) };
    let started = Instant::now();
    let p = c.path("f");
    let changed = std::thread::spawn(move || std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o640)));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !changed.is_finished() {
        assert!(Instant::now() < deadline, "a stopped client blocked a change for a minute");
        std::thread::sleep(Duration::from_millis(50));
    }
    changed.join().unwrap().unwrap();
    eprintln!("chmod with the other client stopped took {:?}", started.elapsed());
    unsafe { libc::kill(b_pid, libc::SIGCONT) };
    assert_eq!(mode(&b.join("f")), 0o640, "the stopped client shows the old mode");
    umount_lazy(&b);
}

/// Requests this mount sent to the metadata server, but for `Renew` (a sign of life, sent
/// when the client is otherwise idle).
fn meta_requests(mnt: &Path) -> u64 {
    request_count(mnt, |n| n.starts_with("meta.") && n != "meta.Renew")
}

#[test]
fn warm_stats_need_no_round_trip_while_leases_hold() {
    let c = Cluster::start(1);
    std::fs::create_dir(c.path("d")).unwrap();
    for i in 0..300 {
        std::fs::write(c.path(&format!("d/f{i}")), b"x").unwrap();
    }
    // Through the open directory, so that only `d` is looked at, not the root's few entries
    // (each looked up on its own until enough lookups there make the client list the root).
    let dir = std::fs::File::open(c.path("d")).unwrap();
    let d = std::path::PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir)));
    let files: Vec<_> = (0..300).map(|i| d.join(format!("f{i}"))).collect();
    let stat_all = || files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum::<u64>();
    // Each pass waits out the kernel's lifetime (at most 4 s), so every stat reaches the
    // client. The first one comes once the listing the client made with the directory has
    // expired (the cache TTL, 10 s), so it asks the server (a few lookups, then the whole
    // listing); the next one must not. Listings come from the kernel's cache once it holds one.
    std::thread::sleep(Duration::from_millis(10_500));
    assert_eq!(stat_all(), 300);
    assert_eq!(names(&d).len(), 300);
    std::thread::sleep(Duration::from_millis(4500));
    let before = meta_requests(&c.mnt);
    assert_eq!(stat_all(), 300);
    assert_eq!(names(&d).len(), 300);
    let after = meta_requests(&c.mnt);
    assert_eq!(after, before, "warm stats and a warm listing of 300 files went to the metadata server");
}

#[test]
fn a_listing_cached_before_a_stop_shows_the_changes_made_meanwhile() {
    let c = Cluster::start(1);
    let (b, b_pid) = c.mount_again_with_pid("b");
    std::fs::create_dir(c.path("d")).unwrap();
    std::fs::write(c.path("d/old"), b"x").unwrap();
    // The second listing on B comes from its kernel's cache.
    assert_eq!(names(&b.join("d")), ["old"]);
    assert_eq!(names(&b.join("d")), ["old"]);
    // SAFETY: stopping and continuing a process this test started.
    unsafe { libc::kill(b_pid, libc::SIGSTOP) };
    // The create waits for B's lease on the directory to end, which B cannot answer.
    std::fs::write(c.path("d/new"), b"x").unwrap();
    unsafe { libc::kill(b_pid, libc::SIGCONT) };
    assert_eq!(names(&b.join("d")), ["new", "old"], "B listed a directory as it was before it stopped");
    umount_lazy(&b);
}

#[test]
fn warm_rereads_of_an_unchanged_file_come_from_the_kernel_page_cache() {
    let c = Cluster::start(1);
    // Larger than the client's own block cache (64 MiB), so only the kernel can hold it all.
    let data = pattern(3, 96 << 20);
    std::fs::write(c.path("big"), &data).unwrap();
    let b = c.mount_again("b", "");
    // Reads after the write come from the pages the write left, or through the client.
    assert!(std::fs::read(c.path("big")).unwrap() == data);
    assert!(std::fs::read(c.path("big")).unwrap() == data);
    // A new open of the unchanged file keeps them. Counted with mincore rather than by chunk
    // requests of a re-read: this machine reclaims cold pages within seconds, so a count of
    // refetched blocks measures the host, while an open that drops the pages leaves none.
    let (resident, pages) = resident_pages(&c.path("big"));
    assert!(resident * 2 >= pages, "a new open of an unchanged file kept {resident} of {pages} pages");
    assert!(std::fs::read(c.path("big")).unwrap() == data);
    // A change through another client drops the kept pages.
    let mut f = std::fs::OpenOptions::new().write(true).open(b.join("big")).unwrap();
    std::io::Write::write_all(&mut f, b"changed through B").unwrap();
    drop(f);
    let seen = std::fs::read(c.path("big")).unwrap();
    assert_eq!(&seen[..17], b"changed through B");
    assert!(seen[17..] == data[17..]);
    umount_lazy(&b);
}

/// Pages of `p` the kernel holds as a new open leaves them (an open without `keep_cache`
/// drops them), and the file's size in pages. Counted with mincore, so nothing is read.
fn resident_pages(p: &Path) -> (usize, usize) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a shared read-only mapping of an open file, only passed to mincore, then unmapped.
    unsafe {
        let addr = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(addr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        let mut pages = vec![0u8; len.div_ceil(4096)];
        assert_eq!(libc::mincore(addr, len, pages.as_mut_ptr()), 0, "mincore: {}", std::io::Error::last_os_error());
        libc::munmap(addr, len);
        (pages.iter().filter(|p| *p & 1 != 0).count(), pages.len())
    }
}

#[test]
fn pages_read_before_this_clients_own_commit_stay_cached() {
    let c = Cluster::start(1);
    let p = c.path("f");
    let data = pattern(5, 8 << 20);
    let mut w = std::fs::File::create(&p).unwrap();
    std::io::Write::write_all(&mut w, &data).unwrap();
    // Read while the writes are still buffered in the client, then commit them.
    assert!(std::fs::read(&p).unwrap() == data);
    w.sync_all().unwrap();
    drop(w);
    let (resident, pages) = resident_pages(&p);
    // An open that drops the pages leaves none; the kernel may reclaim a cold page or two.
    assert!(
        resident * 10 >= pages * 9,
        "the commit of this client's own writes dropped the pages read before it: {resident} of {pages} left"
    );
}

#[test]
fn files_this_client_wrote_keep_their_pages_at_the_next_open() {
    let c = Cluster::start(1);
    let p = c.path("f");
    let data = pattern(7, 8 << 20);
    let mut w = std::fs::File::create(&p).unwrap();
    std::io::Write::write_all(&mut w, &data).unwrap();
    w.sync_all().unwrap();
    drop(w);
    // The kernel cached the writes as they passed through it: reading them back (a linker
    // after a compiler) needs no read through the client.
    let (resident, pages) = resident_pages(&p);
    assert!(resident * 10 >= pages * 9, "the open after this client's own writes kept {resident} of {pages} pages");
    assert!(std::fs::read(&p).unwrap() == data);
}

#[test]
fn pages_stay_cached_when_the_files_map_generation_expires() {
    let c = Cluster::start(1);
    let p = c.path("f");
    let data = pattern(6, 1 << 20);
    std::fs::write(&p, &data).unwrap();
    std::fs::File::open(&p).unwrap().sync_all().unwrap();
    assert!(std::fs::read(&p).unwrap() == data);
    // The client's per-file data generation lives twice the 10 s map TTL.
    std::thread::sleep(Duration::from_secs(21));
    let (resident, pages) = resident_pages(&p);
    // The kernel may reclaim a few cold pages meanwhile; an open that drops them leaves none.
    assert!(resident > 0, "an open 21 s after the last write dropped all {pages} cached pages");
}
