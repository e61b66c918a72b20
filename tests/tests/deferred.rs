//! Namespace changes a client alone on the volume answers itself under the solo lease and
//! sends afterwards (crates/client/src/deferred.rs, crates/meta/src/solo.rs): what it answered
//! must be what the metadata server ends up holding, and another client must see all of it.

use cairn_tests::*;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Changes answered by the mount itself so far.
fn deferred(mnt: &Path) -> u64 {
    request_count(mnt, |n| n.starts_with("deferred.") && n != "deferred.failed")
}

/// Makes and removes directories until the mount answers them itself (it asks for the solo
/// lease at its first change; the answer arrives a moment later).
fn until_deferred(mnt: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let dir = mnt.join("warm-up");
    while deferred(mnt) == 0 {
        assert!(Instant::now() < deadline, "the mount never answered a change itself");
        std::fs::create_dir(&dir).unwrap();
        std::fs::remove_dir(&dir).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every entry under `root` with what `stat` tells of it (all but atime).
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            if m.is_dir() {
                todo.push(path.clone());
            }
            let name = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let what = format!(
                "ino {} mode {:o} uid {} gid {} nlink {} size {} mtime {}.{} ctime {}.{}",
                m.ino(),
                m.mode(),
                m.uid(),
                m.gid(),
                m.nlink(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec()
            );
            out.insert(name, what);
        }
    }
    out
}

/// The directory's own attributes, as [`tree`] tells them.
fn dir_stat(dir: &Path) -> String {
    let m = std::fs::metadata(dir).unwrap();
    format!("nlink {} mtime {}.{} ctime {}.{}", m.nlink(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec())
}

#[test]
fn what_a_lone_client_answered_itself_is_what_the_server_holds() {
    let c = Cluster::start(1);
    until_deferred(&c.mnt);
    let before = deferred(&c.mnt);
    // A setgid directory: new entries take its group, new directories its bit too. The
    // creates after the chmod have the mount list it and learn its attributes again.
    sh(
        &c.mnt,
        "umask 027
         mkdir -p t/a/b t/sg
         chgrp 100 t/sg && chmod 2775 t/sg
         for i in 1 2 3 4 5; do touch t/sg/f$i; done",
    );
    let made = || request_count(&c.mnt, |n| n == "deferred.MakeNode");
    let before_sg = made();
    sh(&c.mnt, "umask 027 && mkdir t/sg/sub && touch t/sg/f");
    assert_eq!(made() - before_sg, 2, "the mkdir and create in the setgid directory were not answered locally");
    sh(
        &c.mnt,
        "umask 027
         for i in $(seq 1 40); do echo $i > t/a/f$i; done
         for i in $(seq 1 10); do mv t/a/f$i t/a/g$i; done
         for i in $(seq 11 15); do mv t/a/f$i t/a/b/h$i; done
         rm t/a/f2? && mkdir t/a/gone && rmdir t/a/gone
         for i in $(seq 1 30); do mkdir t/x$i; touch t/x$i/y; done
         for i in $(seq 1 30); do rm t/x$i/y; rmdir t/x$i; done
         mkdir t/a/b/c && mv t/a/b/c t/a/b/d && touch t/a/b/d/e",
    );
    // What `tar x` does to every directory at the end: times, owner, mode.
    let set = || request_count(&c.mnt, |n| n == "deferred.SetAttr");
    let before_set = set();
    sh(&c.mnt, "touch -d @1000000000.5 t/a/b/d && chown 7:8 t/a/b/d && chmod 705 t/a/b/d && touch -m t/a/b");
    assert_eq!(set() - before_set, 4, "directory attribute changes were not answered locally");
    let answered = deferred(&c.mnt) - before;
    assert!(answered > 100, "only {answered} changes were answered by the mount itself");
    let here = tree(&c.path("t"));
    let root = dir_stat(&c.path("t"));
    assert!(here["sg/sub"].contains("mode 42750 uid 0 gid 100 nlink 2"), "{}", here["sg/sub"]);
    assert!(here["sg/f"].contains("mode 100640 uid 0 gid 100"), "{}", here["sg/f"]);
    assert!(here["a/b/d"].contains("mode 40705 uid 7 gid 8 nlink 2 size"), "{}", here["a/b/d"]);
    assert!(here["a/b/d"].contains("mtime 1000000000.500000000"), "{}", here["a/b/d"]);
    // a, a/b, sg, sg/sub, sg/f, sg/f1..f5; 25 files left in a; h11..h15, d and d/e in a/b.
    assert_eq!(here.len(), 10 + 25 + 7, "{here:#?}");

    // A tree removed as fast as the mount answers: each rmdir that goes to the server waits
    // for the unlinks inside its directory.
    sh(
        &c.mnt,
        "for d in $(seq 1 20); do mkdir -p r/$d/x/y; for f in $(seq 1 30); do echo $f > r/$d/x/y/f$f; done; done
         mkdir -p r/big && for f in $(seq 1 300); do : > r/big/e$f; done",
    );
    sh(&c.mnt, "rm -rf r");
    assert!(!c.path("r").exists());

    // A fresh mount knows only what the metadata server holds.
    c.down();
    c.up(1, &[]);
    assert_eq!(tree(&c.path("t")), here, "what the mount answered differs from what the server holds");
    assert_eq!(dir_stat(&c.path("t")), root, "the parent directory's link count or times differ");
    assert_eq!(request_count(&c.mnt, |n| n == "deferred.failed"), 0);
    assert_eq!(std::fs::read_to_string(c.path("t/a/g7")).unwrap(), "7\n");
    assert_eq!(std::fs::read_to_string(c.path("t/a/b/h12")).unwrap(), "12\n");
}

#[test]
fn another_client_sees_every_change_the_lone_client_answered_itself() {
    let c = Cluster::start(1);
    until_deferred(&c.mnt);
    let before = deferred(&c.mnt);
    // Thousands of changes in a burst: most are still queued when the other client connects.
    sh(
        &c.mnt,
        "mkdir d && cd d
         for i in $(seq 1 1500); do : > f$i; done
         for i in $(seq 1 500); do mv f$i r$i; done
         for i in $(seq 501 1000); do rm f$i; done
         for i in $(seq 1 200); do mkdir m$i; done",
    );
    let other = c.mount_again("other", "");
    let mut names: Vec<String> =
        std::fs::read_dir(other.join("d")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    let mut want: Vec<String> = (1..=500)
        .map(|i| format!("r{i}"))
        .chain((1001..=1500).map(|i| format!("f{i}")))
        .chain((1..=200).map(|i| format!("m{i}")))
        .collect();
    want.sort();
    assert_eq!(names, want, "the other client's listing differs from what the first answered");
    assert_eq!(std::fs::metadata(other.join("d")).unwrap().nlink(), 202);
    assert!(deferred(&c.mnt) - before > 2000, "the changes were not answered by the first mount itself");

    // With another client connected, changes go to the server before they return.
    let during = deferred(&c.mnt);
    std::fs::create_dir(c.path("d/late")).unwrap();
    std::fs::write(c.path("d/late/x"), b"x").unwrap();
    assert_eq!(std::fs::read(other.join("d/late/x")).unwrap(), b"x");
    std::fs::remove_dir(other.join("d/m1")).unwrap();
    assert!(!c.path("d/m1").exists(), "the other client's rmdir is seen at once");
    assert_eq!(deferred(&c.mnt), during, "a change was answered locally while another client was connected");
    assert_eq!(request_count(&c.mnt, |n| n == "deferred.failed"), 0);
    umount_lazy(&other);
}

#[test]
fn a_remount_right_after_a_burst_of_small_files_finds_every_byte() {
    let c = Cluster::start(1);
    until_deferred(&c.mnt);
    // Written as fast as the mount answers, then unmounted and mounted again at once (the
    // benchmarks' cold restart): the old mount still has closes, commits and deferred changes
    // to send while the new one, another client, already asks.
    sh(&c.mnt, "mkdir burst && for d in 0 1 2 3; do mkdir burst/$d; done");
    for i in 0..2000 {
        std::fs::write(c.path(&format!("burst/{}/f{i}", i % 4)), format!("file {i}\n").repeat(100)).unwrap();
    }
    let source = c.source();
    run(std::process::Command::new("umount").arg(&c.mnt));
    run(std::process::Command::new("mount").args(["-t", "cairn", &source]).arg(&c.mnt));
    for i in 0..2000 {
        let got = std::fs::read(c.path(&format!("burst/{}/f{i}", i % 4))).unwrap();
        assert_eq!(got, format!("file {i}\n").repeat(100).into_bytes(), "f{i} after the remount");
    }
}

#[test]
fn a_fresh_mount_answers_removals_in_directories_it_has_not_listed_before() {
    let c = Cluster::start(1);
    sh(
        &c.mnt,
        "mkdir flat && for i in $(seq 1 1500); do : > flat/f$i; done
         for d in $(seq 1 20); do mkdir -p tree/$d/x; for f in 1 2 3 4; do echo $f > tree/$d/x/f$f; done; done",
    );
    // Mounted again: nothing listed, nothing known.
    c.down();
    c.up(1, &[]);
    until_deferred(&c.mnt);
    let count = |kind: &str| request_count(&c.mnt, |n| n == kind);
    let (sent, answered) = (count("meta.Unlink"), count("deferred.Unlink"));
    // `ls -l` leaves the kernel every name (it reads the listing page by page, too long to be
    // kept whole), so each unlink comes without a lookup: the mount lists the directory
    // once it sees a run of them.
    sh(&c.mnt, "ls -l flat > /dev/null && for i in $(seq 1 1500); do echo flat/f$i; done | xargs rm");
    let (sent, answered) = (count("meta.Unlink") - sent, count("deferred.Unlink") - answered);
    assert_eq!(sent + answered, 1500);
    assert!(sent <= 10, "{sent} of 1500 unlinks went to the server, {answered} were answered by the mount");
    // `rm -r` lists each directory before removing what it holds: the listing is kept.
    let rmdirs = count("deferred.Rmdir");
    sh(&c.mnt, "rm -r tree");
    assert_eq!(count("deferred.Rmdir") - rmdirs, 41, "rmdirs of tree's 41 directories answered by the mount");

    c.down();
    c.up(1, &[]);
    assert_eq!(std::fs::read_dir(c.path("flat")).unwrap().count(), 0, "a file the mount removed is back");
    assert!(!c.path("tree").exists());
}

#[test]
fn a_lone_client_opens_listed_files_itself_and_keeps_unlinked_open_ones_alive() {
    let c = Cluster::start(1);
    sh(&c.mnt, "mkdir r && for i in $(seq 1 300); do echo file $i > r/f$i; done");
    c.down();
    c.up(1, &[]);
    until_deferred(&c.mnt);
    let count = |kind: &str| request_count(&c.mnt, |n| n == kind);
    let (sent, answered) = (count("meta.Open"), count("deferred.Open"));
    // `ls -l` lists each file with its attributes and its data's map: what an open answers.
    sh(&c.mnt, "ls -l r > /dev/null");
    for i in 1..=300 {
        let got = std::fs::read_to_string(c.path(&format!("r/f{i}"))).unwrap();
        assert_eq!(got, format!("file {i}\n"));
    }
    let (sent, answered) = (count("meta.Open") - sent, count("deferred.Open") - answered);
    assert_eq!(sent + answered, 300);
    assert!(sent <= 3, "{sent} of 300 opens went to the server, {answered} were answered by the mount");

    // Files this mount wrote itself, committed, rewritten and read back (`git clone` then
    // `git status`, a build writing then reading its objects): the commits' answers tell what
    // an open would, and each open shows the newest data.
    let opens = count("meta.Open");
    for i in 1..=100 {
        std::fs::write(c.path(&format!("r/w{i}")), format!("first {i}\n")).unwrap();
    }
    sh(&c.mnt, "sync");
    for i in 1..=100 {
        let p = c.path(&format!("r/w{i}"));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("first {i}\n"));
        if i % 2 == 0 {
            std::fs::write(&p, format!("second {i}, longer\n")).unwrap();
        }
    }
    sh(&c.mnt, "sync");
    for i in 1..=100 {
        let want = match i % 2 {
            0 => format!("second {i}, longer\n"),
            _ => format!("first {i}\n"),
        };
        assert_eq!(std::fs::read_to_string(c.path(&format!("r/w{i}"))).unwrap(), want);
    }
    let sent = count("meta.Open") - opens;
    assert!(sent <= 3, "{sent} opens of files this mount wrote went to the server");

    // Files this mount created as `git clone` checks them out, some empty, read back right
    // away: the create's answer tells what an open of an empty one would; the others show
    // the data written through the create's handle, not the create's size.
    let opens = count("meta.Open");
    let body = |i: u32| if i.is_multiple_of(2) { format!("now {i}\n") } else { String::new() };
    for i in 1..=100 {
        let mut f = std::fs::File::create(c.path(&format!("r/e{i}"))).unwrap();
        std::io::Write::write_all(&mut f, body(i).as_bytes()).unwrap();
    }
    for i in 1..=100 {
        assert_eq!(std::fs::read_to_string(c.path(&format!("r/e{i}"))).unwrap(), body(i));
    }
    let sent = count("meta.Open") - opens;
    assert!(sent <= 3, "{sent} opens of files this mount just created went to the server");

    // The server learns of an open answered here before the unlink that follows it: the
    // unlinked file lives until its last close (the server frees an unlinked file nobody has
    // open after a grace of a few seconds).
    let used = |want: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = statvfs(&c.mnt);
            let used = s.f_files - s.f_ffree;
            if used == want {
                return;
            }
            assert!(Instant::now() < deadline, "the volume uses {used} inodes, not {want}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // The root, r and its files, once the warm-up's directories are freed.
    used(502);
    let held = std::fs::File::open(c.path("r/f7")).unwrap();
    std::fs::remove_file(c.path("r/f7")).unwrap();
    std::thread::sleep(Duration::from_secs(8));
    used(502);
    drop(held);
    used(501);
    assert_eq!(count("deferred.failed"), 0);
}
