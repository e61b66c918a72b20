//! The optional on-disk block cache: blocks are kept as the chunk servers store them (never
//! in plain text), outlive the mount, and serve reads while the only chunk server is down.

use cairn_tests::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Files of `dir` holding `needle`.
fn files_with(dir: &Path, needle: &[u8]) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| std::fs::read(e.as_ref().unwrap().path()).unwrap().windows(needle.len()).any(|w| w == needle))
        .count()
}

#[test]
fn the_disk_cache_keeps_encoded_blocks_that_outlive_the_mount() {
    let c = Cluster::start(1);
    let marker = b"plain text that must never reach the client's disk";
    let mut data = marker.repeat(2000);
    data.extend(pattern(5, 9 << 20));
    std::fs::write(c.path("f"), &data).unwrap();

    // A client settings file with a disk cache, beside the cluster's own (its TLS paths are
    // relative to it).
    let cache = c.tmp.path().join("disk-cache");
    let settings = std::fs::read_to_string(c.data.join("client.toml")).unwrap();
    assert!(settings.contains("disk_cache_mib = 0\n"), "{settings}");
    let with_cache = format!("disk_cache_mib = 64\ndisk_cache_dir = {:?}\n", cache.display());
    let conf = c.data.join("client-disk.toml");
    std::fs::write(&conf, settings.replace("disk_cache_mib = 0\n", &with_cache)).unwrap();
    let opts = format!("config={}", conf.display());

    let pidfile = c.tmp.path().join("b.pid");
    let b = c.mount_again("b", &format!("{opts},pidfile={}", pidfile.display()));
    assert!(std::fs::read(b.join("f")).unwrap() == data);
    // Blocks are written to the cache in the background: one file per block of 1 MiB.
    let blocks = data.len().div_ceil(1 << 20);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'))
        .count()
        < blocks
    {
        assert!(Instant::now() < deadline, "the disk cache did not fill");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(files_with(&cache, &marker[..32]), 0, "a cached block holds plain text");
    umount_lazy(&b);
    // Gone before the next mount opens the cache (which clears what a mount left half written).
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !exited(pid) {
        assert!(Instant::now() < deadline, "the first mount did not exit after its unmount");
        std::thread::sleep(Duration::from_millis(50));
    }

    // With the only chunk server gone, a new mount reads the file from its disk cache.
    c.kill9("chunk-1");
    let b2 = c.mount_again("b2", &opts);
    assert!(std::fs::read(b2.join("f")).unwrap() == data, "read from the disk cache");
    let stats = run(std::process::Command::new(bin("cairn")).arg("stats").arg(&b2));
    assert!(stats.lines().any(|l| l.starts_with("disk.Get ")), "no read came from the disk cache:\n{stats}");
    umount_lazy(&b2);
}
