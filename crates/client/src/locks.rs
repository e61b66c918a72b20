//! File locks (`fcntl`, OFD and `flock`), enforced by the metadata server for the whole
//! cluster (see `cairn-meta`'s `locks`). This side waits in short rounds, so a signal can
//! interrupt a blocked request between them; keeps data coherent with the locks (buffered
//! writes are committed before a range is released, cached data is dropped when one is
//! taken, as NFS does); and remembers what each owner holds, so that only their closes
//! cost a round trip and a restarted metadata server gets the locks back (`reclaim_locks`).

use crate::{Client, ClientError, Result, unexpected};
use cairn_proto::meta::{LockInfo, LockKind, MetaRequest, MetaResponse, OwnedLocks};
use cairn_proto::{ErrorCode, Ino};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the server waits in one round of a blocking request. Between rounds the caller
/// checks for signals, so this bounds how late an interruption is noticed.
const WAIT_ROUND_MS: u32 = 200;

/// How long to wait before asking again a server that grants no new lock yet (it restarted
/// and waits for other clients to reclaim theirs).
const GRACE_RETRY: Duration = Duration::from_millis(250);

/// How long a client keeps trying to reach the metadata server to reclaim its locks after
/// losing the connection; the server grants reclaims only shortly after its own start.
const RECLAIM_FOR: Duration = Duration::from_secs(60);

/// The whole file, as an unlock range.
const WHOLE: (u64, u64) = (0, u64::MAX);

/// A lock request from the kernel.
#[derive(Clone, Copy, Debug)]
pub struct LockCall {
    pub ino: Ino,
    /// The open handle it came through: what `release` later names.
    pub fh: u64,
    /// The lock owner: the kernel's for POSIX locks (the process's file table), or
    /// [`open_lock_owner`] of the handle for OFD and flock locks.
    pub owner: u64,
    pub start: u64,
    /// Last byte, inclusive.
    pub end: u64,
    pub kind: LockKind,
    /// The locking process, reported to `F_GETLK` callers.
    pub pid: u32,
    /// A `flock` lock rather than a byte-range lock.
    pub flock: bool,
    /// `F_SETLKW` / `flock` without `LOCK_NB`: wait for conflicting locks to go.
    pub sleep: bool,
}

/// Marks the owners that are open handles, apart from the kernel's owner ids.
const OPEN_OWNER: u64 = 1 << 63;

/// The owner of the OFD and flock locks taken through open handle `fh` (an open file
/// description): the handle's number, which this client never gives again, so a late
/// RELEASE of one handle cannot drop the locks of another.
pub fn open_lock_owner(fh: u64) -> u64 {
    OPEN_OWNER | fh
}

/// The locks this client's owners hold, by (inode, lock owner, flock), as the server last
/// reported them, with the handles they were taken through.
#[derive(Default)]
pub(crate) struct Held {
    inner: Mutex<HashMap<(Ino, u64, bool), Owned>>,
    /// Lock requests hold it shared; a reclaim holds it alone, so the server learns of no
    /// change between the reclaim's snapshot and its answer.
    gate: tokio::sync::RwLock<()>,
}

/// One owner's locks of one namespace on one inode.
#[derive(Default)]
struct Owned {
    handles: HashSet<u64>,
    locks: Vec<LockInfo>,
}

impl Held {
    fn note(&self, call: &LockCall, held: Vec<LockInfo>) {
        let mut g = self.inner.lock().expect("held lock");
        let key = (call.ino, call.owner, call.flock);
        if held.is_empty() {
            g.remove(&key);
        } else {
            let owned = g.entry(key).or_default();
            owned.handles.insert(call.fh);
            owned.locks = held;
        }
    }
}

impl Client {
    /// `F_GETLK`: the byte-range lock of another owner (of any client) that a `kind` lock on
    /// `[start, end]` by `owner` would conflict with.
    pub async fn get_lock(
        &self,
        ino: Ino,
        owner: u64,
        start: u64,
        end: u64,
        kind: LockKind,
    ) -> Result<Option<LockInfo>> {
        loop {
            match self.call(MetaRequest::GetLock { ino, owner, start, end, kind }).await {
                Ok(MetaResponse::Lock(l)) => return Ok(l),
                Ok(other) => return Err(unexpected(other)),
                Err(e) if e.code == ErrorCode::Grace => tokio::time::sleep(GRACE_RETRY).await,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sets, changes or releases a lock. A sleeping request waits until the lock is free;
    /// between rounds it asks `interrupted` and gives up with `Interrupted` (EINTR) when it
    /// says so. A conflict without sleep is `WouldBlock`, a deadlock `Deadlock`.
    pub async fn set_lock(self: &Arc<Self>, call: LockCall, interrupted: impl Fn() -> bool) -> Result<()> {
        if call.kind != LockKind::Unlock {
            self.check_up()?;
        }
        // Releasing or downgrading a range lets others read what this client wrote under
        // it: commit buffered writes first. A release happens even if that fails (the error
        // is reported after it); a read lock is then not taken.
        let flushed = match call.kind {
            LockKind::Write => Ok(()),
            LockKind::Read => Ok(self.flush(call.ino, false).await?),
            LockKind::Unlock => self.flush(call.ino, false).await,
        };
        let req = MetaRequest::SetLock {
            ino: call.ino,
            owner: call.owner,
            start: call.start,
            end: call.end,
            kind: call.kind,
            pid: call.pid,
            flock: call.flock,
            wait_ms: if call.sleep { WAIT_ROUND_MS } else { 0 },
        };
        loop {
            let gate = self.locks.gate.read().await;
            let answer = self.call(req.clone()).await;
            if let Ok(MetaResponse::LockHeld(held)) = &answer {
                self.locks.note(&call, held.clone());
            }
            drop(gate);
            match answer {
                Ok(MetaResponse::LockHeld(_)) => {
                    if call.kind != LockKind::Unlock {
                        self.lock_taken(call.ino).await;
                    }
                    return flushed;
                }
                Ok(other) => return Err(unexpected(other)),
                Err(e) if (e.code == ErrorCode::WouldBlock && call.sleep) || e.code == ErrorCode::Grace => {
                    if interrupted() {
                        return Err(ClientError::new(ErrorCode::Interrupted, "interrupted while waiting for a lock"));
                    }
                    if e.code == ErrorCode::Grace {
                        tokio::time::sleep(GRACE_RETRY).await;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether this client has seen `owner` take a byte-range lock on `ino` that a close
    /// would have to release.
    pub(crate) fn may_hold_locks(&self, ino: Ino, owner: u64) -> bool {
        self.locks.inner.lock().expect("held lock").contains_key(&(ino, owner, false))
    }

    /// A close (FUSE `FLUSH`) by `owner`: POSIX says closing any descriptor of a file
    /// releases all of the process's byte-range locks on it. No round trip unless this
    /// client has seen `owner` lock `ino`.
    pub async fn locks_flushed(self: &Arc<Self>, ino: Ino, owner: u64) -> Result<()> {
        let known = self.locks.inner.lock().expect("held lock").remove(&(ino, owner, false)).is_some();
        match known {
            true => self.unlock_all(ino, owner, false).await,
            false => Ok(()),
        }
    }

    /// The last close of handle `fh` (FUSE `RELEASE`): the locks of the open file
    /// description go (OFD and flock locks, owned by [`open_lock_owner`]`(fh)`; the process's
    /// own were dropped at `FLUSH`). Found by the handle they were taken through, or by
    /// `flock_owner`, which the kernel names when it knows a flock was taken: where the mount
    /// could not tell OFD and flock calls apart, they were taken under the kernel's owner.
    pub async fn locks_released(self: &Arc<Self>, ino: Ino, fh: u64, flock_owner: Option<u64>) -> Result<()> {
        let keys: Vec<(Ino, u64, bool)> = {
            let mut g = self.locks.inner.lock().expect("held lock");
            let keys: Vec<_> = g
                .iter()
                .filter(|(k, o)| k.0 == ino && (o.handles.contains(&fh) || Some(k.1) == flock_owner))
                .map(|(k, _)| *k)
                .collect();
            keys.iter().for_each(|k| {
                g.remove(k);
            });
            keys
        };
        let mut result = Ok(());
        for (ino, owner, flock) in keys {
            result = result.and(self.unlock_all(ino, owner, flock).await);
        }
        result
    }

    async fn unlock_all(self: &Arc<Self>, ino: Ino, owner: u64, flock: bool) -> Result<()> {
        let req = MetaRequest::SetLock {
            ino,
            owner,
            start: WHOLE.0,
            end: WHOLE.1,
            kind: LockKind::Unlock,
            pid: 0,
            flock,
            wait_ms: 0,
        };
        let _gate = self.locks.gate.read().await;
        match self.call(req).await? {
            MetaResponse::LockHeld(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Takes back, on a new connection to the metadata server, every lock this client's
    /// owners held on the lost one. A restarted server grants them during its grace period;
    /// otherwise (the connection was lost but the server kept running and dropped them, so
    /// another client may have taken them since) they are lost: logged and counted, as NFS
    /// does, since the processes holding them cannot be told.
    pub(crate) async fn reclaim_locks(&self) {
        let _gate = self.locks.gate.write().await;
        let locks: Vec<OwnedLocks> = {
            let g = self.locks.inner.lock().expect("held lock");
            g.iter().map(|(&(ino, owner, flock), o)| OwnedLocks { ino, owner, flock, held: o.locks.clone() }).collect()
        };
        if locks.is_empty() {
            return;
        }
        let until = Instant::now() + RECLAIM_FOR;
        let got = loop {
            match self.call(MetaRequest::ReclaimLocks { locks: locks.clone() }).await {
                Ok(MetaResponse::Reclaimed(got)) if got.len() == locks.len() => break got,
                Ok(other) => {
                    tracing::error!("cannot reclaim locks: {}", unexpected(other));
                    break vec![false; locks.len()];
                }
                Err(e) if Instant::now() < until => {
                    tracing::debug!("reclaiming locks: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    tracing::error!("cannot reclaim locks: {e}");
                    break vec![false; locks.len()];
                }
            }
        };
        let mut g = self.locks.inner.lock().expect("held lock");
        for (set, _) in locks.iter().zip(got).filter(|(_, ok)| !ok) {
            tracing::error!(
                ino = set.ino,
                owner = set.owner,
                flock = set.flock,
                "a lock was lost with the connection to the metadata server; its holder no longer has it"
            );
            self.stats.count("locks", "lost");
            let key = (set.ino, set.owner, set.flock);
            if g.get(&key).is_some_and(|o| o.locks == set.held) {
                g.remove(&key);
            }
        }
    }

    /// A lock was taken: what another client wrote before releasing it must show, so the
    /// file's cached data, size and attributes go, here and in the kernel's page cache.
    async fn lock_taken(&self, ino: Ino) {
        self.forget_inode(ino);
        self.invalidate_kernel_for(vec![ino], Vec::new()).await;
    }
}
