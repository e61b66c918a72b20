//! Commits that carry attribute changes (`MetaRequest::Commit::attrs`), on a real SQLite store.

use crate::data::Commit;
use crate::{MetaConfig, MetaService, Store};
use cairn_proto::meta::{Caller, SetAttrs, XattrMode};
use cairn_proto::*;
use std::time::Duration;

async fn service(dir: &std::path::Path) -> MetaService {
    let store = Store::open(&dir.join("meta.db")).await.unwrap();
    let info = VolumeInfo {
        name: "v".into(),
        uuid: "u".into(),
        chunk_size: 64 << 20,
        block_size: 1 << 20,
        replication: 1,
        compression: 0,
        encrypted: false,
    };
    store.format(&info, 0, 0).await.unwrap();
    start(dir, store).await
}

/// The metadata server on a formatted store, as at a (re)start.
async fn start(dir: &std::path::Path, store: Store) -> MetaService {
    let none = dir.join("none");
    let config = MetaConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        db: dir.join("meta.db"),
        ca: none.clone(),
        cert: none.clone(),
        key: none.clone(),
        dead_after: Duration::from_secs(10),
        key_file: none,
        orphan_grace: Duration::from_secs(3600),
        lock_grace: Duration::ZERO,
        rebalance_threshold: 0,
        metrics: None,
    };
    MetaService::new(store, &config).await.unwrap()
}

const CONN: usize = 1;

/// A file `name` created open by `CONN`, with its write lease.
async fn new_file(svc: &MetaService, name: &str) -> (Ino, u64) {
    let caller = Caller { uid: 0, gid: 0, groups: Vec::new() };
    let (a, _) = svc
        .make_node(CONN, ROOT_INO, name.as_bytes(), FileKind::File, 0o644, 0o644, 0, None, &caller, true, None)
        .await
        .unwrap();
    let (lease, _) = svc.write_lease(CONN, a.ino).await.unwrap();
    (a.ino, lease)
}

fn slice(id: SliceId, len: u32) -> NewSlice {
    NewSlice { chunk: 0, slice: SliceRef { pos: 0, len, id, servers: vec![1] } }
}

fn tar_attrs(mtime: Timestamp) -> SetAttrs {
    SetAttrs { perm: Some(0o600), uid: Some(12), gid: Some(34), mtime: Some(TimeSet::At(mtime)), ..SetAttrs::default() }
}

async fn commit(
    svc: &MetaService,
    ino: Ino,
    lease: u64,
    id: SliceId,
    attrs: Option<&SetAttrs>,
) -> Result<Attr, ErrorCode> {
    let slices = [slice(id, 100)];
    let c = Commit { slices: &slices, min_size: 100, durable: false, lease, written_at: Timestamp::now(), attrs };
    svc.commit(CONN, ino, c).await.map(|(a, _)| a).map_err(|e| WireError::from(e).code)
}

#[tokio::test]
async fn a_commit_applies_its_attribute_changes_after_its_slices_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let archived = Timestamp { secs: 1_153_704_088, nanos: 5 };

    // Applied together: the explicit mtime wins over the write's.
    let (f, lease) = new_file(&svc, "f").await;
    let a = commit(&svc, f, lease, 10, Some(&tar_attrs(archived))).await.unwrap();
    assert_eq!((a.size, a.perm, a.uid, a.gid, a.mtime), (100, 0o600, 12, 34, archived));
    assert_eq!(svc.getattr(f).await.unwrap(), a, "what the answer said is what is stored");
    assert_eq!(svc.read_map(f, 0).await.unwrap().0.len(), 1);

    // Under a lost lease, neither the slices nor the attributes.
    let (g, lease) = new_file(&svc, "g").await;
    let before = svc.getattr(g).await.unwrap();
    assert_eq!(commit(&svc, g, lease + 1, 11, Some(&tar_attrs(archived))).await, Err(ErrorCode::LeaseLost));
    assert_eq!(svc.getattr(g).await.unwrap(), before);
    assert!(svc.read_map(g, 0).await.unwrap().0.is_empty());

    // An append-only file refuses the attributes, and then the slices are not applied either
    // (the client commits them again alone).
    let (h, lease) = new_file(&svc, "h").await;
    let append = SetAttrs { flags: Some(inode_flags::APPEND), ..SetAttrs::default() };
    svc.setattr(h, &append, false).await.unwrap();
    let before = svc.getattr(h).await.unwrap();
    assert_eq!(commit(&svc, h, lease, 12, Some(&tar_attrs(archived))).await, Err(ErrorCode::Perm));
    assert_eq!(svc.getattr(h).await.unwrap(), before);
    assert_eq!(commit(&svc, h, lease, 12, None).await.unwrap().size, 100, "the slices alone");

    // A file with xattrs: the slices, then the attributes in a second transaction.
    let (x, lease) = new_file(&svc, "x").await;
    let caller = Caller { uid: 0, gid: 0, groups: Vec::new() };
    svc.set_xattr(x, b"user.k", b"v", XattrMode::Any, &caller).await.unwrap();
    let a = commit(&svc, x, lease, 13, Some(&tar_attrs(archived))).await.unwrap();
    assert_eq!((a.size, a.perm, a.uid, a.gid, a.mtime), (100, 0o600, 12, 34, archived));
    assert_eq!(svc.read_map(x, 0).await.unwrap().0.len(), 1);

    // Only mode, owner and mtime travel with a commit.
    let truncate = SetAttrs { size: Some(0), ..SetAttrs::default() };
    assert_eq!(commit(&svc, f, lease, 14, Some(&truncate)).await, Err(ErrorCode::Invalid));
}

/// Commits that wait for the writer together are applied in one transaction, each with its
/// own answer; one under a lost lease among them applies nothing and is refused alone.
#[tokio::test]
async fn commits_waiting_together_are_applied_together_with_their_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let mut files = Vec::new();
    for i in 0..10 {
        files.push(new_file(&svc, &format!("f{i}")).await);
    }
    let lost = 3;
    let writer = svc.store.write().await.unwrap();
    let commits = futures::future::join_all(files.iter().enumerate().map(|(i, &(ino, lease))| {
        let svc = &svc;
        let lease = if i == lost { lease + 1 } else { lease };
        let slices = [slice(100 + i as u64, 10 + i as u32)];
        async move {
            let written_at = Timestamp::now();
            let c =
                Commit { slices: &slices, min_size: 10 + i as u64, durable: i == 5, lease, written_at, attrs: None };
            svc.commit(CONN, ino, c).await.map_err(|e| WireError::from(e).code)
        }
    }));
    // The commits queue up behind the writer this test holds, then go in one transaction.
    let release = async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(writer);
    };
    let (answers, ()) = tokio::join!(commits, release);
    for (i, (&(ino, _), answer)) in files.iter().zip(answers).enumerate() {
        if i == lost {
            assert_eq!(answer.unwrap_err(), ErrorCode::LeaseLost);
            assert!(svc.read_map(ino, 0).await.unwrap().0.is_empty());
            continue;
        }
        let (a, map) = answer.unwrap();
        assert_eq!((a.ino, a.size), (ino, 10 + i as u64));
        assert_eq!(map.unwrap().iter().map(|s| s.id).collect::<Vec<_>>(), vec![100 + i as u64]);
        assert_eq!(svc.getattr(ino).await.unwrap(), a, "what the answer said is what is stored");
    }
    assert_eq!(svc.commits.grouped(), 10, "all ten went in one transaction");
}

#[tokio::test]
async fn write_lease_epochs_granted_after_a_restart_are_above_every_earlier_one() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let (ino, mut last) = new_file(&svc, "f").await;
    drop(svc);
    // A power cut can take back the last grant (it is not synced): what a later start grants
    // must still differ from it, so it starts above every epoch of earlier starts.
    for boot in 2..4u64 {
        let svc = start(dir.path(), Store::open(&dir.path().join("meta.db")).await.unwrap()).await;
        assert_eq!(svc.lease_floor, boot << 32);
        let (epoch, _) = svc.write_lease(CONN, ino).await.unwrap();
        assert!(epoch >= boot << 32 && epoch > last, "epoch {epoch} after a restart, {last} before");
        last = epoch;
    }
}
