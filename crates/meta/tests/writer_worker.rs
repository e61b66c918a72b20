//! The writer connection's SQLite worker thread is kept on the CPU of the thread that hands
//! it work (see `Writer::follow`); reader-pool workers are left free.

use cairn_meta::Store;

/// The CPUs `tid` (0: this thread) may run on.
fn cpus_of(tid: libc::pid_t) -> usize {
    // SAFETY: sched_getaffinity fills a cpu_set_t we own; CPU_COUNT reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set), 0);
        libc::CPU_COUNT(&set) as usize
    }
}

/// The process's sqlx SQLite worker threads and how many CPUs each may run on.
fn sqlx_workers() -> Vec<(libc::pid_t, usize)> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let t = t.unwrap();
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let tid: libc::pid_t = t.file_name().to_str()?.parse().ok()?;
            comm.starts_with("sqlx-sqlite").then(|| (tid, cpus_of(tid)))
        })
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn the_writer_worker_follows_its_caller_and_readers_stay_free() {
    let available = cpus_of(0);
    assert!(available > 1, "this test needs a machine with more than one CPU");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("meta.db")).await.unwrap();
    let info = cairn_proto::VolumeInfo {
        name: "v".into(),
        uuid: "u".into(),
        chunk_size: 64 << 20,
        block_size: 1 << 20,
        replication: 1,
        compression: 0,
        encrypted: false,
    };
    // A write: it takes the writer connection, which moves its worker first.
    store.format(&info, 0, 0).await.unwrap();
    let workers = sqlx_workers();
    let pinned: Vec<_> = workers.iter().filter(|(_, cpus)| *cpus == 1).collect();
    assert_eq!(pinned.len(), 1, "exactly one worker (the writer's) should be kept on one CPU: {workers:?}");
    assert!(workers.iter().any(|(_, cpus)| *cpus == available), "reader-pool workers should run anywhere: {workers:?}");
}
