//! Self-healing with real server processes: a chunk server killed in the middle of a write,
//! a corrupt copy on disk found by scrub and replaced, copies moved by drain and rebalance,
//! the metadata server killed during a metadata workload. `cairn fsck` must find nothing
//! wrong afterwards, and every byte whose fsync returned must read back intact.

use cairn_tests::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// A file name and the contents it must have.
type NamedData = (String, Vec<u8>);

/// Every block on every chunk server of the cluster: `(server id, block)`.
fn stored_blocks(c: &Cluster) -> Vec<(u64, StoredBlock)> {
    let mut out = Vec::new();
    for id in 1..=8u64 {
        out.extend(stored_blocks_of(&c.data.join(format!("chunk-{id}"))).into_iter().map(|b| (id, b)));
    }
    out.sort();
    out
}

/// Number of valid copies of each block (by name), and the corrupt ones.
fn copies(c: &Cluster) -> (BTreeMap<String, usize>, Vec<StoredBlock>) {
    let (mut good, mut bad) = (BTreeMap::new(), Vec::new());
    for (_, block) in stored_blocks(c) {
        match cairn_block::verify(&block.read()) {
            Ok(_) => *good.entry(block.name.clone()).or_default() += 1,
            Err(_) => bad.push(block),
        }
    }
    (good, bad)
}

/// `cairn fsck` succeeds (it exits non-zero on any inconsistency) and reports no problem.
fn fsck_clean(c: &Cluster) {
    let out = c.cairn(&["fsck"]);
    assert!(out.contains(": 0 problems"), "{out}");
}

/// The slices `cairn status` counts on chunk server `id`.
fn slices_on(status: &str, id: u64) -> u64 {
    let line = status
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
        .unwrap_or_else(|| panic!("no chunk server {id} in {status}"));
    let before = &line[..line.find(" slices").unwrap_or_else(|| panic!("no slice count in {line:?}"))];
    before.split_whitespace().last().unwrap().parse().unwrap()
}

fn assert_same(path: &Path, want: &[u8]) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        got.len() == want.len() && got == want,
        "{} differs ({} bytes, want {})",
        path.display(),
        got.len(),
        want.len()
    );
}

#[test]
fn chunk_server_killed_mid_write_loses_no_fsynced_byte() {
    let c = Cluster::start_with(4, &["--replication", "3", "--separate-zones", "-o", "timeout=2"]);
    let pieces = 24u64;
    let synced = Arc::new(AtomicU64::new(0));
    let writer = {
        let (path, synced) = (c.path("big"), synced.clone());
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut f = std::fs::File::create(path)?;
            for i in 0..pieces {
                f.write_all(&pattern(i, 4 * MIB))?;
                f.sync_all()?;
                synced.store(i + 1, Ordering::SeqCst);
            }
            Ok(())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while synced.load(Ordering::SeqCst) < 6 {
        assert!(Instant::now() < deadline && !writer.is_finished(), "the writer stalled before the kill");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.kill9("chunk-2");
    let killed_at = synced.load(Ordering::SeqCst);
    let result = writer.join().unwrap();
    let done = synced.load(Ordering::SeqCst);
    eprintln!("killed chunk-2 after {killed_at} fsynced pieces; {done} of {pieces} fsynced: {result:?}");
    // Three copies on four servers: losing one must not stop the writer.
    result.expect("writing with one of four chunk servers killed");

    // Every fsynced byte, from a client with nothing cached, while the server is still down.
    let want: Vec<u8> = (0..done).flat_map(|i| pattern(i, 4 * MIB)).collect();
    let cold = c.mount_again("cold", "");
    assert_same(&cold.join("big"), &want);
    umount_lazy(&cold);

    let s = c.wait_status("the repair to finish", Duration::from_secs(120), |s| {
        s.contains("DEAD")
            && status_count(s, "repair", "re-replicated") > 0
            && status_count(s, "repair", "slices short") == 0
    });
    assert_eq!(status_count(&s, "repair", "with no live copy"), 0, "{s}");
    fsck_clean(&c);
}

#[test]
fn corrupt_copy_is_read_around_and_scrub_replaces_it() {
    let c = Cluster::start_with(4, &["--replication", "3", "--separate-zones"]);
    c.down();
    for id in 1..=4 {
        c.set_config(&format!("chunk-{id}.toml"), "scrub_interval_secs", "2");
    }
    c.set_config("meta.toml", "orphan_grace_secs", "2");
    c.up(4, &[]);

    let data = pattern(7, 6 * MIB + 12345);
    {
        let mut f = std::fs::File::create(c.path("precious")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    let (good, bad) = copies(&c);
    assert!(bad.is_empty() && !good.is_empty() && good.values().all(|n| *n == 3), "{good:?} {bad:?}");

    // Flip bytes in the middle of one copy of the first block, as a failing disk would.
    let (_, victim) = stored_blocks(&c).into_iter().next().unwrap();
    let mut bytes = victim.read();
    let mid = bytes.len() / 2;
    bytes[mid] = !bytes[mid];
    victim.overwrite(&bytes);
    assert_eq!(copies(&c).1, vec![victim.clone()]);

    // Reads fall back to a good copy: right bytes, never EIO.
    let cold = c.mount_again("cold", "");
    assert_same(&cold.join("precious"), &data);
    umount_lazy(&cold);

    // Scrub finds it, the metadata server has a good copy made, reconciliation drops the bad
    // one if the new copy went elsewhere: three good copies of every block, none corrupt.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (good, bad) = copies(&c);
        if bad.is_empty() && good.values().all(|n| *n == 3) {
            break;
        }
        assert!(Instant::now() < deadline, "not repaired: {good:?}, corrupt {bad:?}\n{}", c.status());
        std::thread::sleep(Duration::from_millis(500));
    }
    let s = c.status();
    assert!(status_count(&s, "maintenance", "corrupt copies") >= 1, "{s}");
    let cold = c.mount_again("after", "");
    assert_same(&cold.join("precious"), &data);
    umount_lazy(&cold);
    fsck_clean(&c);
}

#[test]
fn rebalance_and_drain_move_copies_without_losing_data() {
    let c = Cluster::start_with(2, &["--replication", "1"]);
    c.down();
    c.set_config("meta.toml", "rebalance_threshold_mib", "4");
    c.set_config("meta.toml", "orphan_grace_secs", "2");
    c.up(2, &[]);
    let files: Vec<NamedData> = (0..8).map(|i| (format!("f{i}"), pattern(100 + i, 3 * MIB + i as usize))).collect();
    for (name, data) in &files {
        let mut f = std::fs::File::create(c.path(name)).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }

    // A new, empty server gets a share of the slices.
    c.up(3, &[]);
    c.wait_status("the rebalancer to fill chunk server 3", Duration::from_secs(90), |s| slices_on(s, 3) >= 2);

    // Draining server 1 moves everything off it; then it can go.
    let out = c.cairn(&["chunk", "drain", "1"]);
    assert!(out.contains("holds no slice"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored_blocks(&c).iter().any(|(id, _)| *id == 1) {
        assert!(Instant::now() < deadline, "reconciliation left blocks on the drained server");
        std::thread::sleep(Duration::from_millis(500));
    }
    c.kill9("chunk-1");
    let cold = c.mount_again("cold", "");
    for (name, data) in &files {
        assert_same(&cold.join(name), data);
    }
    umount_lazy(&cold);
    let s = c.status();
    assert!(status_count(&s, "maintenance", "slices moved") >= 2, "{s}");
    fsck_clean(&c);
}

#[test]
fn metadata_server_killed_mid_workload_leaves_a_consistent_namespace() {
    let c = Cluster::start_with(4, &["--separate-zones", "-o", "timeout=2"]);
    for d in ["keep", "churn"] {
        std::fs::create_dir(c.path(d)).unwrap();
    }
    // Files whose data and name were fsynced, with their contents.
    let kept: Arc<Mutex<Vec<NamedData>>> = Default::default();
    let workload = {
        let (root, kept) = (c.mnt.clone(), kept.clone());
        std::thread::spawn(move || -> std::io::Result<u64> {
            let churn = root.join("churn");
            for i in 0u64.. {
                let d = churn.join(format!("d{i}"));
                std::fs::create_dir(&d)?;
                std::fs::write(d.join("f"), format!("file {i}"))?;
                std::fs::hard_link(d.join("f"), churn.join(format!("h{i}")))?;
                std::os::unix::fs::symlink(format!("d{i}/f"), churn.join(format!("s{i}")))?;
                if i > 0 {
                    let prev = churn.join(format!("d{}", i - 1));
                    std::fs::rename(prev.join("f"), d.join("g"))?;
                    std::fs::remove_file(churn.join(format!("h{}", i - 1)))?;
                    if i > 1 {
                        std::fs::remove_file(prev.join("g"))?;
                    }
                    std::fs::remove_dir(&prev)?;
                }
                if i % 5 == 0 {
                    let name = format!("k{i}");
                    let data = pattern(i, 1000 + i as usize * 37);
                    let mut f = std::fs::File::create(root.join("keep").join(&name))?;
                    f.write_all(&data)?;
                    f.sync_all()?;
                    std::fs::File::open(root.join("keep"))?.sync_all()?;
                    kept.lock().unwrap().push((name, data));
                }
            }
            unreachable!()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while kept.lock().unwrap().len() < 20 {
        if workload.is_finished() {
            panic!("the workload failed on its own: {:?}", workload.join().unwrap());
        }
        assert!(Instant::now() < deadline, "the workload stalled");
        std::thread::sleep(Duration::from_millis(10));
    }
    c.kill9("meta");
    let err = workload.join().unwrap().expect_err("the workload went on without a metadata server");
    eprintln!("workload stopped: {err}");

    c.up(4, &[]);
    fsck_clean(&c);
    let kept = kept.lock().unwrap().clone();
    let cold = c.mount_again("cold", "");
    for (name, data) in &kept {
        assert_same(&cold.join("keep").join(name), data);
    }
    umount_lazy(&cold);
}

#[test]
fn fsck_reports_a_damaged_namespace() {
    let c = Cluster::start(1);
    std::fs::create_dir(c.path("dir")).unwrap();
    for name in ["a", "b", "dir/c"] {
        std::fs::write(c.path(name), name).unwrap();
    }
    fsck_clean(&c);
    // A local cluster's servers share one disk, hence one failure domain, and status says
    // what that means for the default of three copies.
    let s = c.status();
    assert!(s.contains("replication 3 (warning: 1 live failure domain(s), so blocks get 1 copy)"), "{s}");
    // Damage the database behind the servers' back, as a bug or a bad restore would.
    c.down();
    let db = c.data.join(toml_value(&c.data.join("meta.toml"), "database"));
    run(std::process::Command::new("sqlite3").arg(&db).arg(
        "UPDATE inodes SET nlink = 5 WHERE ino = (SELECT ino FROM dentries WHERE name = CAST('a' AS BLOB));
         DELETE FROM dentries WHERE name = CAST('dir' AS BLOB);",
    ));
    c.up(1, &[]);
    let out = std::process::Command::new(bin("cairn")).arg("fsck").arg("--data").arg(&c.data).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "fsck passed a damaged volume:\n{text}");
    for problem in [
        "has nlink 5, but 1 entries name it",
        "directory 1 has nlink 3, but 0 subdirectories",
        "has 0 entries naming it",
        "is not reachable from the root",
    ] {
        assert!(text.contains(problem), "fsck missed {problem:?}:\n{text}");
    }
    assert!(text.contains(": 4 problems"), "{text}");
}

#[test]
fn full_chunk_server_leaves_the_copies_to_the_others() {
    // Three copies on three servers: every slice wants the small one until it is full.
    let t = FullDisk::start(3, &["--replication", "3", "--separate-zones"], "8m");
    let c = &t.c;
    let data = pattern(3, 40 * MIB);
    {
        let mut f = std::fs::File::create(c.path("big")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    // Small files too, whose blocks are rows of the servers' databases: 8 MiB of them.
    let small: Vec<NamedData> = (0..200).map(|i| (format!("small-{i}"), pattern(100 + i, 40 << 10))).collect();
    for (name, bytes) in &small {
        let mut f = std::fs::File::create(c.path(name)).unwrap();
        f.write_all(bytes).unwrap();
        f.sync_all().unwrap();
    }
    let cold = c.mount_again("cold", "");
    assert_same(&cold.join("big"), &data);
    for (name, bytes) in &small {
        assert_same(&cold.join(name), bytes);
    }
    umount_lazy(&cold);
    // Every block has a good copy on both other servers; the full one holds what fit.
    let (good, bad) = copies(c);
    assert!(bad.is_empty(), "{bad:?}");
    assert!(good.len() >= 10 && good.values().all(|n| *n >= 2), "{good:?}");
    let on_full = stored_blocks(c).iter().filter(|(id, _)| *id == 1).count();
    assert!(on_full < good.len(), "{on_full} blocks on an 8 MiB server");
    fsck_clean(c);
}

/// `cairn gc` reconciles every chunk server at once and says what waits: a copy left on a
/// server that was down while its file was removed is found, kept for the grace period, and
/// the other server's copies are gone with the file.
#[test]
fn gc_finds_copies_left_on_a_server_that_was_down() {
    let c = Cluster::start_with(2, &["--replication", "2", "--separate-zones"]);
    let data = pattern(11, 3 * MIB);
    for name in ["gone", "kept"] {
        let mut f = std::fs::File::create(c.path(name)).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    let before = stored_blocks_of(&c.data.join("chunk-2")).len();
    assert!(before >= 6, "two files of three blocks each on server 2, found {before}");
    c.kill9("chunk-2");
    c.wait_status("chunk server 2 to be declared dead", Duration::from_secs(60), |s| {
        s.lines().any(|l| l.trim_start().starts_with("2 ") && l.contains("DEAD"))
    });
    std::fs::remove_file(c.path("gone")).unwrap();
    // The file is freed and its copies on server 1 deleted (server 2 is skipped while dead).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = c.cairn(&["gc"]);
        assert!(!out.contains("chunk server 2:"), "a dead server is not reconciled: {out}");
        if out.contains("0 removed files about to be freed, 0 slices of their data queued") {
            break;
        }
        assert!(Instant::now() < deadline, "the removed file's data was not deleted: {out}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(stored_blocks_of(&c.data.join("chunk-1")).len(), before / 2, "server 1 still holds the removed file");

    c.up(2, &[]);
    c.wait_status("chunk server 2 to be back", Duration::from_secs(60), |s| {
        s.lines().any(|l| l.trim_start().starts_with("2 ") && l.contains("alive"))
    });
    let out = c.cairn(&["gc"]);
    let line = out.lines().find(|l| l.starts_with("chunk server 2:")).unwrap_or_else(|| panic!("{out}"));
    // "chunk server 2: S slices stored, D deleted now, W unreferenced waiting (…)"
    let numbers: Vec<u64> = line.split([' ', ',']).filter_map(|w| w.parse().ok()).collect();
    let (stored, deleted, waiting) = (numbers[0], numbers[1], numbers[2]);
    assert!(waiting >= 1 && deleted == 0 && stored >= waiting, "{out}");
    assert!(out.contains("deleted 3600 s after"), "{out}");
    assert_eq!(stored_blocks_of(&c.data.join("chunk-2")).len(), before, "nothing is deleted within the grace period");
    let cold = c.mount_again("cold", "");
    assert_same(&cold.join("kept"), &data);
    umount_lazy(&cold);
}
