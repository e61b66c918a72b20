//! Write leases between two clients (separate mount processes) on one volume: a client buffers
//! writes under its file's write lease, and another client's read recalls the lease, so the
//! buffered write is committed before the read runs: a write that returned is read elsewhere
//! with no close, fsync or sleep in between. A writer that cannot be reached loses its lease
//! and its later commits fail with EIO.

use cairn_tests::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn a_write_that_returned_is_read_at_once_through_another_client() {
    let c = Cluster::start(1);
    let (a, b) = (c.mnt.clone(), c.mount_again("b", ""));
    std::fs::write(a.join("f"), b"").unwrap();
    let mut on_a = std::fs::OpenOptions::new().write(true).open(a.join("f")).unwrap();
    let mut on_b = std::fs::OpenOptions::new().read(true).write(true).open(b.join("f")).unwrap();
    let mut want = Vec::new();
    for round in 0..20u32 {
        // Through A: a write kept open (neither closed nor fsynced), then a read through B,
        // both through a path and through a handle B kept open.
        let text = format!("round {round} through A\n");
        on_a.write_all(text.as_bytes()).unwrap();
        want.extend_from_slice(text.as_bytes());
        assert_eq!(read(&b.join("f")), want, "round {round}: write on A, read on B");
        assert_eq!(std::fs::metadata(b.join("f")).unwrap().len(), want.len() as u64, "round {round}: size on B");
        let mut seen = Vec::new();
        on_b.seek(SeekFrom::Start(0)).unwrap();
        on_b.read_to_end(&mut seen).unwrap();
        assert_eq!(seen, want, "round {round}: write on A, read through a handle open on B");

        // And the other way round, overwriting what A wrote last.
        let text = format!("ROUND {round} THROUGH B\n");
        let at = want.len() - text.len();
        on_b.seek(SeekFrom::Start(at as u64)).unwrap();
        on_b.write_all(text.as_bytes()).unwrap();
        want[at..].copy_from_slice(text.as_bytes());
        assert_eq!(read(&a.join("f")), want, "round {round}: write on B, read on A");
        // A's handle writes at its own offset, which is the end of the file.
        on_a.seek(SeekFrom::End(0)).unwrap();
    }
    drop((on_a, on_b));
    let stats = run(std::process::Command::new(bin("cairn")).arg("stats").arg(&a));
    assert!(stats.lines().any(|l| l.starts_with("meta.WriteLease")), "A never asked for a write lease:\n{stats}");
    umount_lazy(&b);
}

#[test]
fn changes_on_another_client_land_after_the_buffered_writes() {
    let c = Cluster::start(1);
    let (a, b) = (c.mnt.clone(), c.mount_again("b", ""));
    std::fs::write(a.join("f"), b"").unwrap();
    std::fs::hard_link(a.join("f"), a.join("g")).unwrap();
    let mut on_a = std::fs::OpenOptions::new().write(true).open(a.join("f")).unwrap();
    for round in 0..5u32 {
        // Each change below names the file A is writing, some twice (as what they read and
        // what they change); each must wait for A's buffered write, then go on.
        on_a.write_all(format!("{round}").as_bytes()).unwrap();
        let mode = if round % 2 == 0 { 0o600 } else { 0o644 };
        std::fs::set_permissions(b.join("f"), std::fs::Permissions::from_mode(mode)).unwrap();
        on_a.write_all(b"x").unwrap();
        xattr_set(&b.join("f"), &format!("user.round{round}"));
        on_a.write_all(b"y").unwrap();
        std::fs::hard_link(b.join("f"), b.join(format!("h{round}"))).unwrap();
        on_a.write_all(b"z").unwrap();
        // A listing that shows the file under three names.
        let listed = std::fs::read_dir(&b).unwrap().count();
        assert_eq!(listed, 3 + round as usize, "round {round}");
        let want: Vec<u8> = (0..=round).flat_map(|r| format!("{r}xyz").into_bytes()).collect();
        assert_eq!(read(&b.join("g")), want, "round {round}: read on B through another name");
    }
    // A truncate on B lands after A's buffered write, and A's next write follows it.
    on_a.write_all(b"buffered").unwrap();
    std::fs::OpenOptions::new().write(true).open(b.join("f")).unwrap().set_len(2).unwrap();
    assert_eq!(read(&a.join("f")), b"0x", "truncate on B after A's buffered write");
    on_a.write_all(b"!").unwrap();
    drop(on_a);
    let after = read(&b.join("f"));
    assert_eq!(after.len() as u64, std::fs::metadata(a.join("f")).unwrap().len());
    assert_eq!(after.last(), Some(&b'!'));
    umount_lazy(&b);
}

fn xattr_set(p: &Path, name: &str) {
    let (path, name) = (cpath(p), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid NUL-terminated strings and a 1-byte value.
    let rc = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
    assert_eq!(rc, 0, "setxattr {}: errno {}", p.display(), errno());
}

#[test]
fn appends_through_two_clients_lose_no_record() {
    const RECORDS: usize = 300;
    let c = Cluster::start(1);
    let (a, b) = (c.mnt.clone(), c.mount_again("b", ""));
    std::fs::write(a.join("log"), b"").unwrap();
    let writers: Vec<_> = [("A", a.clone()), ("B", b.clone())]
        .into_iter()
        .map(|(who, mnt)| {
            std::thread::spawn(move || {
                let mut f = std::fs::OpenOptions::new().append(true).open(mnt.join("log")).unwrap();
                for i in 0..RECORDS {
                    // One write per record, as a logger does.
                    f.write_all(format!("{who} {i:06} {}\n", "x".repeat(40)).as_bytes()).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    for mnt in [&a, &b] {
        let text = String::from_utf8(read(&mnt.join("log"))).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2 * RECORDS, "records lost or torn, seen through {}", mnt.display());
        lines.sort();
        let mut want: Vec<String> = ["A", "B"]
            .iter()
            .flat_map(|w| (0..RECORDS).map(move |i| format!("{w} {i:06} {}", "x".repeat(40))))
            .collect();
        want.sort();
        assert_eq!(lines, want, "seen through {}", mnt.display());
    }
    umount_lazy(&b);
}

#[test]
fn a_truncate_on_one_client_is_seen_by_the_next_read_on_another() {
    let c = Cluster::start(1);
    let (a, b) = (c.mnt.clone(), c.mount_again("b", ""));
    let data = pattern(7, 300_000);
    std::fs::write(a.join("f"), &data).unwrap();
    assert_eq!(read(&b.join("f")), data);
    let on_b = std::fs::File::open(b.join("f")).unwrap();
    // Through a handle A keeps open, with more data buffered past the new end first.
    let mut on_a = std::fs::OpenOptions::new().write(true).open(a.join("f")).unwrap();
    on_a.seek(SeekFrom::Start(200_000)).unwrap();
    on_a.write_all(b"buffered, then cut off").unwrap();
    on_a.set_len(1000).unwrap();
    assert_eq!(read(&b.join("f")), &data[..1000], "truncate on A, read on B");
    let mut seen = Vec::new();
    (&on_b).read_to_end(&mut seen).unwrap();
    assert_eq!(seen, &data[..1000], "truncate on A, read through a handle open on B");
    // Growing it again reads as zeros past the old end.
    on_a.set_len(5000).unwrap();
    let mut want = data[..1000].to_vec();
    want.resize(5000, 0);
    assert_eq!(read(&b.join("f")), want, "extend on A, read on B");
    umount_lazy(&b);
}

#[test]
fn a_stopped_writer_loses_its_lease_and_cannot_overwrite_newer_data() {
    let c = Cluster::start(1);
    let (b, b_pid) = c.mount_again_with_pid("b");
    std::fs::write(c.path("f"), b"committed before").unwrap();
    let mut on_b = std::fs::OpenOptions::new().write(true).open(b.join("f")).unwrap();
    on_b.write_all(b"buffered on B, never committed").unwrap();
    // SAFETY: stopping and continuing a process this test started.
    unsafe { libc::kill(b_pid, libc::SIGSTOP) };
    let started = Instant::now();
    let p = c.path("f");
    let writer = std::thread::spawn(move || std::fs::write(p, b"written on A while B was stopped"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !writer.is_finished() {
        assert!(Instant::now() < deadline, "a stopped writer blocked another client for a minute");
        std::thread::sleep(Duration::from_millis(50));
    }
    writer.join().unwrap().unwrap();
    eprintln!("a write with the lease holder stopped took {:?}", started.elapsed());
    unsafe { libc::kill(b_pid, libc::SIGCONT) };
    // B's buffered write comes back as an error, and what A wrote stays.
    let err = match on_b.sync_all() {
        Ok(()) => panic!(
            "B's commit under a lost lease must fail\n{}\n{}",
            std::fs::read_to_string(c.data.join("logs/b.log")).unwrap_or_default(),
            std::fs::read_to_string(c.data.join("logs/meta.log")).unwrap_or_default()
        ),
        Err(e) => e,
    };
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(on_b);
    for mnt in [&c.mnt, &b] {
        assert_eq!(read(&mnt.join("f")), b"written on A while B was stopped", "through {}", mnt.display());
    }
    // B can write again once it asks for a new lease.
    std::fs::write(b.join("f"), b"B again").unwrap();
    assert_eq!(read(&c.path("f")), b"B again");
    umount_lazy(&b);
}

#[test]
fn a_killed_writer_leaves_no_torn_data() {
    let c = Cluster::start(1);
    let (b, b_pid) = c.mount_again_with_pid("b");
    let old = pattern(1, 3 << 20);
    std::fs::write(c.path("f"), &old).unwrap();
    let mut on_b = std::fs::OpenOptions::new().write(true).open(b.join("f")).unwrap();
    let new = pattern(2, 3 << 20);
    on_b.write_all(&new).unwrap();
    kill9(b_pid);
    let seen = read(&c.path("f"));
    assert!(seen == old || seen == new, "a killed writer left torn data ({} bytes)", seen.len());
    drop(on_b);
    umount_lazy(&b);
}

/// How many `SetAttr` requests this mount sent.
fn set_attrs(mnt: &Path) -> u64 {
    let stats = run(std::process::Command::new(bin("cairn")).arg("stats").arg(mnt));
    stats.lines().find_map(|l| l.strip_prefix("meta.SetAttr ")).map_or(0, |n| n.trim().parse().unwrap())
}

#[test]
fn attribute_changes_kept_with_buffered_writes_reach_other_clients_in_order() {
    use std::os::unix::fs::MetadataExt;
    let c = Cluster::start(1);
    let (a, b) = (c.mnt.clone(), c.mount_again("b", ""));
    let archived = std::time::UNIX_EPOCH + Duration::from_secs(1_153_704_088);
    let recent = |m: &std::fs::Metadata| m.modified().unwrap() > archived + Duration::from_secs(1_000_000);
    // What `tar x` does with every file: write, set the mtime, chown and chmod, then close.
    // The three changes travel with the data, in its commit: no SetAttr. (No process is
    // started while the file is open: the child's close-on-exec would flush it.)
    let before = set_attrs(&a);
    let mut f = std::fs::File::create(a.join("f")).unwrap();
    f.write_all(b"from the archive").unwrap();
    f.set_modified(archived).unwrap();
    std::os::unix::fs::fchown(&f, Some(1234), Some(5678)).unwrap();
    f.set_permissions(std::fs::Permissions::from_mode(0o640)).unwrap();
    let seen = f.metadata().unwrap();
    assert_eq!((seen.mode() & 0o7777, seen.uid(), seen.gid()), (0o640, 1234, 5678), "A's own view");
    assert_eq!(seen.modified().unwrap(), archived, "A's own view of the mtime");
    drop(f);
    let on_b = std::fs::metadata(b.join("f")).unwrap();
    assert_eq!((on_b.mode() & 0o7777, on_b.uid(), on_b.gid(), on_b.len()), (0o640, 1234, 5678, 16));
    assert_eq!(on_b.modified().unwrap(), archived, "mtime seen on B");
    // B's stat waited for A's commit (write-behind after the close, or the recall).
    assert_eq!(set_attrs(&a), before, "the changes were not sent with the commit");

    // Changes not sent yet are recalled with the buffered writes by another client's stat.
    let mut g = std::fs::File::create(a.join("g")).unwrap();
    g.write_all(b"kept open").unwrap();
    g.set_permissions(std::fs::Permissions::from_mode(0o600)).unwrap();
    let on_b = std::fs::metadata(b.join("g")).unwrap();
    assert_eq!((on_b.mode() & 0o7777, on_b.len()), (0o600, 9), "chmod and write on A, stat on B");
    // A write after an explicit mtime moves it on, as it would on a local disk.
    g.write_all(b"!").unwrap();
    g.set_modified(archived).unwrap();
    assert_eq!(g.metadata().unwrap().modified().unwrap(), archived);
    g.write_all(b"!").unwrap();
    assert!(recent(&g.metadata().unwrap()), "a later write kept an older mtime on A");
    drop(g);
    let on_b = std::fs::metadata(b.join("g")).unwrap();
    assert!(recent(&on_b), "a later write kept an older mtime on B");
    assert_eq!((on_b.mode() & 0o7777, on_b.len()), (0o600, 11));
    umount_lazy(&b);
    // And all of it is on the server: a new client sees the same.
    let fresh = c.mount_again("fresh", "");
    let again = std::fs::metadata(fresh.join("f")).unwrap();
    assert_eq!((again.mode() & 0o7777, again.uid(), again.gid(), again.len()), (0o640, 1234, 5678, 16));
    assert_eq!(again.modified().unwrap(), archived);
    umount_lazy(&fresh);
}

#[test]
fn a_write_keeps_its_mtime_when_it_is_committed_later() {
    let c = Cluster::start(1);
    let b = c.mount_again("b", "");
    let mut f = std::fs::File::create(c.path("f")).unwrap();
    f.write_all(b"buffered").unwrap();
    let at_write = f.metadata().unwrap().modified().unwrap();
    // Whatever commits the write later must not stamp it with its own time.
    std::thread::sleep(Duration::from_millis(50));
    let on_b = std::fs::metadata(b.join("f")).unwrap();
    assert_eq!((on_b.len(), on_b.modified().unwrap()), (8, at_write), "B's stat recalled the write");
    drop(f);
    let after_close = std::fs::metadata(c.path("f")).unwrap().modified().unwrap();
    assert_eq!(after_close, at_write, "the mtime moved after the close");
    umount_lazy(&b);
}

/// Write-behind: a close leaves the buffered writes to a background commit, so a chmod and an
/// mtime given after the close join them; an unmount right after the closes still commits
/// everything before the client process ends.
#[test]
fn files_closed_just_before_an_unmount_keep_their_data_and_later_attributes() {
    use std::os::unix::fs::MetadataExt;
    let c = Cluster::start(1);
    let (b, pid) = c.mount_again_with_pid("b");
    std::fs::create_dir(b.join("d")).unwrap();
    let mtime = 1_000_000_000 + 7;
    for i in 0..300u64 {
        let p = b.join(format!("d/f{i}"));
        std::fs::write(&p, pattern(i, 3000 + i as usize * 50)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let times = [libc::timespec { tv_sec: mtime, tv_nsec: 0 }; 2];
        // SAFETY: a valid path and two timespecs.
        assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, cpath(&p).as_ptr(), times.as_ptr(), 0) }, 0);
    }
    // Last, a file whose data cannot be stored before the unmount: the chunk server is
    // stopped from before its close until after the unmount.
    let big = pattern(999, 8 << 20);
    let mut f = std::fs::File::create(b.join("d/big")).unwrap();
    f.write_all(&big).unwrap();
    let chunk = c.pid("chunk-1");
    // SAFETY: plain kill(2) on a process this test's cluster started.
    unsafe { libc::kill(chunk, libc::SIGSTOP) };
    drop(f);
    let status = std::process::Command::new("umount").arg(&b).status().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: as above.
    unsafe { libc::kill(chunk, libc::SIGCONT) };
    assert!(status.success(), "umount {}", b.display());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !exited(pid) {
        assert!(Instant::now() < deadline, "the unmounted client did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..300u64 {
        let p = c.path(&format!("d/f{i}"));
        assert!(read(&p) == pattern(i, 3000 + i as usize * 50), "{}: data", p.display());
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o640, "{}: mode", p.display());
        assert_eq!(m.mtime(), mtime, "{}: mtime", p.display());
    }
    assert!(read(&c.path("d/big")) == big, "the file closed last");
}

#[test]
fn a_reader_that_keeps_its_file_open_sees_each_write_without_stalling_the_recall() {
    let c = Cluster::start(1);
    let b = c.mount_again("b", "");
    let writer =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(c.path("log")).unwrap();
    writer.write_all_at(&[b'-'; 4096], 0).unwrap();
    writer.sync_all().unwrap();
    let reader = std::fs::File::open(b.join("log")).unwrap();
    for i in 0..20u32 {
        let record = format!("record {i:04}");
        writer.write_all_at(record.as_bytes(), 0).unwrap();
        // B's read recalls A's write lease; A's commit then recalls B's read lease while B's
        // kernel still holds the page being read locked.
        let mut seen = vec![0u8; record.len()];
        reader.read_exact_at(&mut seen, 0).unwrap();
        assert_eq!(seen, record.as_bytes(), "B read stale data");
    }
    let stalled = request_count(&b, |n| n == "kernel.slow_invalidations");
    assert_eq!(stalled, 0, "recalls waited for B's kernel to drop pages it was reading into");
    drop(reader);
    umount_lazy(&b);
}
