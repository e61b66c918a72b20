//! What fsync promises survives a crash of everything: every server process and the client are
//! killed with SIGKILL right after the fsyncs return, the cluster is started again, and every
//! fsynced byte, directory and name must be back.

use cairn_tests::*;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Deterministic, position-dependent bytes so misplaced or stale data is caught.
fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn fsync_dir(p: &Path) {
    File::open(p).and_then(|d| d.sync_all()).unwrap_or_else(|e| panic!("fsync of directory {}: {e}", p.display()));
}

/// Writes `data` to a new file and fsyncs it, keeping the handle open if asked.
fn write_synced(p: &Path, data: &[u8]) -> File {
    let mut f = File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all(data).unwrap();
    f.sync_all().unwrap_or_else(|e| panic!("fsync {}: {e}", p.display()));
    f
}

fn compare(p: &Path, want: &[u8]) {
    let got = std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    assert_eq!(
        got.len(),
        want.len(),
        "{}: size {} after the crash, {} was fsynced",
        p.display(),
        got.len(),
        want.len()
    );
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{}: first wrong byte at offset {i}", p.display());
    }
}

/// Every entry below `dir` as `relative path -> kind`, sorted.
fn tree(dir: &Path) -> BTreeMap<String, &'static str> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            let rel = e.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            let kind = if t.is_dir() {
                stack.push(e.path());
                "dir"
            } else if t.is_symlink() {
                "symlink"
            } else {
                "file"
            };
            out.insert(rel, kind);
        }
    }
    out
}

/// Dirty or under-writeback page counts of a file, from cachestat(2); `None` if the kernel
/// lacks the call.
fn unwritten_pages(p: &Path) -> Option<u64> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let f = File::open(p).ok()?;
    let range = Range { off: 0, len: 0 };
    let mut st = Stat::default();
    // SAFETY: cachestat(fd, range, out, 0) with valid pointers to repr(C) structs.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            &range as *const Range,
            &mut st as *mut Stat,
            0u32,
        )
    };
    (rc == 0).then_some(st.dirty + st.writeback)
}

/// Block files on the chunk servers whose pages have not reached the disk. After fsync every
/// stored block must be clean: killing processes keeps the page cache, so without this check
/// a missing fsync on a chunk server would go unnoticed.
fn unsynced_blocks(data: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let mut stack: Vec<_> = std::fs::read_dir(data)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("chunk-")))
        .collect();
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                // SQLite's WAL index of the small block database: shared memory, never synced,
                // rebuilt from the write-ahead log after a crash.
                Ok(_) if p.to_string_lossy().ends_with(".db-shm") => {}
                Ok(t) if t.is_file() => match unwritten_pages(&p) {
                    Some(0) => {}
                    Some(n) => bad.push(format!("{} ({n} pages)", p.display())),
                    None if !p.exists() => {} // deleted by garbage collection meanwhile
                    None => {
                        eprintln!("cachestat(2) unavailable: not checking block fsyncs");
                        return Vec::new();
                    }
                },
                _ => {}
            }
        }
    }
    bad
}

#[test]
fn fsynced_data_and_names_survive_kill9_of_every_process() {
    let c = Cluster::start(3);
    let root = c.path("d");

    // A directory tree, created before any of its files is written or fsynced.
    for d in ["a/b/c", "a/e", "f/g/h/i", "empty/dir"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::set_permissions(root.join("a/e"), std::fs::Permissions::from_mode(0o710)).unwrap();

    // Files of many shapes: empty, tiny, unaligned, several blocks (1 MiB), across a chunk
    // (64 MiB), many small ones in one directory.
    let mut want: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let sizes: &[(&str, usize)] = &[
        ("zero", 0),
        ("one", 1),
        ("a/small", 4095),
        ("a/b/c/unaligned", 1_000_003),
        ("a/b/blocks", 9 << 20 | 12_345),
        ("f/g/h/i/across-chunk", (64 << 20) + (3 << 20) + 7),
    ];
    let mut open_handles = Vec::new();
    for (i, (name, len)) in sizes.iter().enumerate() {
        let data = pattern(i as u32, *len);
        let f = write_synced(&root.join(name), &data);
        open_handles.push(f);
        want.insert(name.to_string(), data);
    }
    for i in 0..50 {
        let name = format!("a/e/many-{i:02}");
        let data = pattern(1000 + i, 100 + i as usize * 37);
        write_synced(&root.join(&name), &data);
        want.insert(name, data);
    }

    // Overwrites in place and appends, each fsynced: the latest fsynced version must win.
    let mut rewritten = pattern(77, 6 << 20);
    {
        let mut f = write_synced(&root.join("rewritten"), &rewritten);
        let patch = pattern(78, 1 << 20);
        f.seek(SeekFrom::Start(3 << 20 | 999)).unwrap();
        f.write_all(&patch).unwrap();
        rewritten[(3 << 20 | 999)..(4 << 20 | 999)].copy_from_slice(&patch);
        let tail = pattern(79, 300_000);
        f.seek(SeekFrom::End(0)).unwrap();
        f.write_all(&tail).unwrap();
        rewritten.extend_from_slice(&tail);
        f.sync_data().unwrap();
    }
    want.insert("rewritten".into(), rewritten);

    // Truncated, then fsynced.
    {
        let f = write_synced(&root.join("truncated"), &pattern(80, 5 << 20));
        f.set_len(1_234_567).unwrap();
        f.sync_all().unwrap();
        want.insert("truncated".into(), pattern(80, 5 << 20)[..1_234_567].to_vec());
    }

    // Atomic replace: write a temporary file, fsync it, rename over the target, fsync the dir.
    let old = pattern(81, 70_000);
    write_synced(&root.join("a/config"), &old);
    let new = pattern(82, 90_000);
    write_synced(&root.join("a/.config.tmp"), &new);
    std::fs::rename(root.join("a/.config.tmp"), root.join("a/config")).unwrap();
    want.insert("a/config".into(), new);

    // Names made after the files were written.
    std::os::unix::fs::symlink("a/b/blocks", root.join("link")).unwrap();
    std::fs::hard_link(root.join("one"), root.join("f/one-again")).unwrap();
    want.insert("f/one-again".into(), want["one"].clone());

    // A file still being written when the crash comes: its fsynced prefix must survive.
    let prefix = pattern(83, 2 << 20 | 5);
    let mut growing = write_synced(&root.join("growing"), &prefix);
    growing.write_all(&pattern(84, 1 << 20)).unwrap();

    // fsync every directory, deepest first, then the mount root.
    let dirs: Vec<String> = tree(&root).into_iter().filter(|(_, k)| *k == "dir").map(|(p, _)| p).collect();
    for d in dirs.iter().rev() {
        fsync_dir(&root.join(d));
    }
    fsync_dir(&root);
    fsync_dir(&c.mnt);

    let mut expected_tree = tree(&root);
    expected_tree.remove("growing");
    let e_mode = std::fs::metadata(root.join("a/e")).unwrap().mode() & 0o7777;
    assert_eq!(e_mode, 0o710);

    let bad = unsynced_blocks(&c.data);
    assert!(bad.is_empty(), "fsync returned but these blocks are not on disk yet:\n{}", bad.join("\n"));

    // Crash everything at once: SIGKILL first, then wait for each to be gone.
    let names = ["mount", "meta", "chunk-1", "chunk-2", "chunk-3"];
    let pids: Vec<i32> = names.iter().map(|n| c.pid(n)).collect();
    for &pid in &pids {
        // SAFETY: kill(2) on processes this test's cluster started (from its pid files).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for &pid in &pids {
        kill9(pid);
        assert!(
            !Path::new(&format!("/proc/{pid}/cmdline")).exists()
                || std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default().is_empty(),
            "process {pid} survived SIGKILL"
        );
    }
    drop(open_handles);
    drop(growing);
    umount_lazy(&c.mnt);
    assert!(mount_source(&c.mnt).is_none(), "dead mount still attached");

    c.up(3, &[]);
    for n in names {
        assert!(!pids.contains(&c.pid(n)), "{n} was not restarted");
    }

    let mut got_tree = tree(&root);
    got_tree.remove("growing");
    assert_eq!(got_tree, expected_tree, "directory tree after the crash");
    for (name, data) in &want {
        compare(&root.join(name), data);
    }
    assert_eq!(std::fs::metadata(root.join("a/e")).unwrap().mode() & 0o7777, 0o710);
    assert_eq!(std::fs::read_link(root.join("link")).unwrap(), Path::new("a/b/blocks"));
    assert_eq!(std::fs::metadata(root.join("one")).unwrap().nlink(), 2);
    assert!(!root.join("a/.config.tmp").exists());
    let g = std::fs::read(root.join("growing")).unwrap();
    assert!(g.len() >= prefix.len(), "growing: {} bytes after the crash, {} were fsynced", g.len(), prefix.len());
    assert!(g[..prefix.len()] == prefix[..], "growing: fsynced prefix damaged");

    // The restarted cluster keeps working: new data is written and read back.
    let after = pattern(99, 3 << 20);
    write_synced(&root.join("after"), &after);
    compare(&root.join("after"), &after);
}
