//! Cluster-wide file locks: `fcntl` byte-range locks (classic POSIX and OFD) and `flock`
//! locks, held in memory per inode and enforced for every client.
//!
//! An owner is the client's connection paired with the kernel's lock owner id there (the
//! process's file table for POSIX locks, the open file description for OFD and flock locks),
//! so owners of different clients never mix and all of a client's locks go with its
//! connection. Byte-range locks of one owner are kept as the kernel keeps them
//! (`posix_lock_file`): disjoint ranges, where setting a range splits or replaces what the
//! owner held there and merges with adjacent ranges of the same kind. flock locks are
//! whole-file locks in a namespace of their own: on Linux flock and fcntl locks do not see
//! each other.
//!
//! The table lives in memory. Clients keep what their owners hold and take it back after a
//! restart: a server that may have had locks when it stopped (see `MetaService::record_locks`)
//! starts with a grace period in which it grants only such reclaims, so nobody else can take
//! a lock before its holder had time to reconnect (as NFSv4 does).

use cairn_proto::meta::{LockInfo, LockKind, OwnedLocks};
use cairn_proto::{ErrorCode, Ino};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Longest wait one `SetLock` request may ask for: a client waits in rounds, and every
/// round must end well before the client's network deadline.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(5);

/// How long after a wait round ends its owner still counts as waiting, for deadlock
/// detection: the client asks again at once, and a cycle closed between two rounds must
/// still be seen.
const WAIT_GRACE: Duration = Duration::from_millis(500);

/// A lock owner, unique in the cluster: (client connection, kernel lock owner id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Owner {
    pub(crate) conn: usize,
    pub(crate) id: u64,
}

/// One held range, `[start, end]` inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lock {
    owner: Owner,
    start: u64,
    end: u64,
    write: bool,
    pid: u32,
}

impl Lock {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    fn info(&self) -> LockInfo {
        let kind = if self.write { LockKind::Write } else { LockKind::Read };
        LockInfo { kind, start: self.start, end: self.end, pid: self.pid }
    }
}

/// The locks of one inode.
#[derive(Default)]
struct FileLocks {
    posix: Vec<Lock>,
    flock: Vec<Lock>,
    /// Bumped whenever the locks change; waiters subscribe before they sleep.
    changed: Option<watch::Sender<()>>,
}

impl FileLocks {
    fn is_empty(&self) -> bool {
        self.posix.is_empty() && self.flock.is_empty()
    }

    fn wake(&self) {
        if let Some(tx) = &self.changed {
            tx.send_replace(());
        }
    }
}

/// An owner blocked in a wait round, and on whom.
struct Wait {
    blockers: Vec<Owner>,
    until: Instant,
}

#[derive(Default)]
struct Inner {
    files: HashMap<Ino, FileLocks>,
    /// The wait-for graph of byte-range locks (flock waits are not checked for deadlocks,
    /// as on Linux).
    waits: HashMap<Owner, Wait>,
    /// Connections already dropped: a request of theirs still waiting when the connection
    /// ended must not get a lock nobody would release. (One word per closed connection.)
    gone: HashSet<usize>,
}

/// A lock to set, change or release.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LockRequest {
    pub(crate) ino: Ino,
    pub(crate) owner: Owner,
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) kind: LockKind,
    pub(crate) pid: u32,
    pub(crate) flock: bool,
}

/// The lock table of the whole volume.
#[derive(Default)]
pub(crate) struct Locks {
    inner: Mutex<Inner>,
    /// Until when only reclaims are granted (none: no grace period).
    grace_until: Option<Instant>,
}

impl Locks {
    /// An empty table that grants only reclaims for `grace` (zero: none).
    pub(crate) fn new(grace: Duration) -> Locks {
        let grace_until = (!grace.is_zero()).then(|| Instant::now() + grace);
        Locks { grace_until, ..Default::default() }
    }

    /// Refuses new locks with `Grace` while reclaims are awaited.
    fn check_grace(&self) -> Result<(), ErrorCode> {
        match self.grace_until.is_some_and(|until| Instant::now() < until) {
            true => Err(ErrorCode::Grace),
            false => Ok(()),
        }
    }

    /// `F_GETLK`: the first byte-range lock of another owner that a `kind` lock on
    /// `[start, end]` would conflict with (`Grace` while locks may still be reclaimed).
    pub(crate) fn get(
        &self,
        ino: Ino,
        owner: Owner,
        start: u64,
        end: u64,
        kind: LockKind,
    ) -> Result<Option<LockInfo>, ErrorCode> {
        let write = match kind {
            LockKind::Unlock => return Ok(None),
            k => k == LockKind::Write,
        };
        self.check_grace()?;
        let g = self.inner.lock().expect("locks lock");
        let Some(file) = g.files.get(&ino) else { return Ok(None) };
        Ok(file.posix.iter().find(|l| conflicts(l, owner, start, end, write)).map(Lock::info))
    }

    /// Sets, changes or releases a lock; waits up to `wait` for conflicting locks to go.
    /// Returns the locks of that namespace the owner now holds on the inode. Refuses with
    /// `WouldBlock` when the wait ends (or at once without a wait), with `Deadlock` when
    /// waiting would close a cycle of byte-range lock owners, and with `Grace` (but for an
    /// unlock) during the grace period.
    pub(crate) async fn set(&self, req: &LockRequest, wait: Duration) -> Result<Vec<LockInfo>, ErrorCode> {
        if req.kind != LockKind::Unlock {
            self.check_grace()?;
        }
        let deadline = Instant::now() + wait.min(MAX_WAIT);
        loop {
            let mut changed = {
                let mut g = self.inner.lock().expect("locks lock");
                let blockers = match g.try_set(req) {
                    Ok(held) => {
                        if !req.flock && req.kind != LockKind::Unlock {
                            g.waits.remove(&req.owner);
                        }
                        return Ok(held);
                    }
                    Err(blockers) => blockers,
                };
                let now = Instant::now();
                if wait.is_zero() || now >= deadline {
                    return Err(ErrorCode::WouldBlock);
                }
                if !req.flock {
                    if g.deadlocks(req.owner, &blockers, now) {
                        g.waits.remove(&req.owner);
                        return Err(ErrorCode::Deadlock);
                    }
                    g.waits.retain(|_, w| w.until > now);
                    g.waits.insert(req.owner, Wait { blockers, until: deadline + WAIT_GRACE });
                }
                let file = g.files.get_mut(&req.ino).expect("a conflicting lock's file");
                file.changed.get_or_insert_with(|| watch::channel(()).0).subscribe()
            };
            // A dropped sender (the inode lost its last lock) also ends the sleep.
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                return Err(ErrorCode::WouldBlock);
            }
        }
    }

    /// Takes back locks a client held before the server restarted, for connection `conn`.
    /// Each owner's set is granted whole or not at all: not after the grace period (another
    /// owner may have held them since), nor where it conflicts with what others reclaimed.
    pub(crate) fn reclaim(&self, conn: usize, locks: &[OwnedLocks]) -> Vec<bool> {
        if self.check_grace().is_ok() {
            return vec![false; locks.len()];
        }
        let mut g = self.inner.lock().expect("locks lock");
        locks
            .iter()
            .map(|set| {
                let owner = Owner { conn, id: set.owner };
                let req = |l: &LockInfo| LockRequest {
                    ino: set.ino,
                    owner,
                    start: l.start,
                    end: l.end,
                    kind: l.kind,
                    pid: l.pid,
                    flock: set.flock,
                };
                let whole = LockInfo { kind: LockKind::Unlock, start: 0, end: u64::MAX, pid: 0 };
                let ok = set.held.iter().all(|l| l.kind != LockKind::Unlock && g.try_set(&req(l)).is_ok());
                if !ok {
                    let _ = g.try_set(&req(&whole));
                }
                ok
            })
            .collect()
    }

    /// Whether no lock is held.
    pub(crate) fn idle(&self) -> bool {
        self.inner.lock().expect("locks lock").files.is_empty()
    }

    /// Drops every lock and wait of a connection (the client is gone) and wakes the waiters
    /// of the inodes it held locks on.
    pub(crate) fn drop_conn(&self, conn: usize) {
        let mut g = self.inner.lock().expect("locks lock");
        g.files.retain(|_, file| {
            let before = file.posix.len() + file.flock.len();
            file.posix.retain(|l| l.owner.conn != conn);
            file.flock.retain(|l| l.owner.conn != conn);
            if file.posix.len() + file.flock.len() != before {
                file.wake();
            }
            !file.is_empty()
        });
        g.waits.retain(|o, _| o.conn != conn);
        g.gone.insert(conn);
    }
}

impl Inner {
    /// Applies the request if nothing conflicts and returns the owner's locks of that
    /// namespace on the inode; otherwise returns the owners in the way.
    fn try_set(&mut self, req: &LockRequest) -> Result<Vec<LockInfo>, Vec<Owner>> {
        if self.gone.contains(&req.owner.conn) {
            return Ok(Vec::new());
        }
        let file = self.files.entry(req.ino).or_default();
        let list = if req.flock { &mut file.flock } else { &mut file.posix };
        if req.kind != LockKind::Unlock {
            let write = req.kind == LockKind::Write;
            let mut blockers: Vec<Owner> = Vec::new();
            for l in list.iter().filter(|l| conflicts(l, req.owner, req.start, req.end, write)) {
                if !blockers.contains(&l.owner) {
                    blockers.push(l.owner);
                }
            }
            if !blockers.is_empty() {
                return Err(blockers);
            }
        }
        let before = list.clone();
        apply(list, req);
        let held = list.iter().filter(|l| l.owner == req.owner).map(Lock::info).collect();
        let changed = *list != before;
        if changed {
            file.wake();
        }
        if file.is_empty() {
            // Dropping the sender wakes any waiter still subscribed: it tries again.
            self.files.remove(&req.ino);
        }
        Ok(held)
    }

    /// Whether one of `blockers` waits, directly or through other waiting owners, for `me`.
    fn deadlocks(&self, me: Owner, blockers: &[Owner], now: Instant) -> bool {
        let mut todo: Vec<Owner> = blockers.to_vec();
        let mut seen: Vec<Owner> = Vec::new();
        while let Some(o) = todo.pop() {
            if o == me {
                return true;
            }
            if seen.contains(&o) {
                continue;
            }
            seen.push(o);
            if let Some(w) = self.waits.get(&o).filter(|w| w.until > now) {
                todo.extend(w.blockers.iter().copied());
            }
        }
        false
    }
}

/// Whether `l` stops `owner` from taking a (`write` or read) lock on `[start, end]`.
fn conflicts(l: &Lock, owner: Owner, start: u64, end: u64, write: bool) -> bool {
    l.owner != owner && l.overlaps(start, end) && (l.write || write)
}

/// Sets `req` over the owner's locks in `list` as the kernel does: the requested range
/// replaces whatever the owner held there (an unlock just removes it, possibly splitting a
/// lock in two), and merges with the owner's overlapping or adjacent locks of the same kind.
/// The owner's locks stay disjoint, and same-kind ones never touch.
fn apply(list: &mut Vec<Lock>, req: &LockRequest) {
    let (start, end) = (req.start, req.end);
    let write = req.kind == LockKind::Write;
    let (mut lo, mut hi) = (start, end);
    let mut out = Vec::with_capacity(list.len() + 2);
    for l in list.drain(..) {
        if l.owner != req.owner {
            out.push(l);
            continue;
        }
        let touches = l.start <= end.saturating_add(1) && start <= l.end.saturating_add(1);
        if req.kind != LockKind::Unlock && l.write == write && touches {
            lo = lo.min(l.start);
            hi = hi.max(l.end);
            continue;
        }
        if !l.overlaps(start, end) {
            out.push(l);
            continue;
        }
        if l.start < start {
            out.push(Lock { end: start - 1, ..l });
        }
        if l.end > end {
            out.push(Lock { start: end + 1, ..l });
        }
    }
    if req.kind != LockKind::Unlock {
        out.push(Lock { owner: req.owner, start: lo, end: hi, write, pid: req.pid });
    }
    out.sort_by_key(|l| (l.start, l.owner.conn, l.owner.id));
    *list = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Owner = Owner { conn: 1, id: 7 };
    const B: Owner = Owner { conn: 2, id: 7 };
    const C: Owner = Owner { conn: 3, id: 9 };

    fn req(owner: Owner, start: u64, end: u64, kind: LockKind) -> LockRequest {
        LockRequest { ino: 5, owner, start, end, kind, pid: owner.conn as u32, flock: false }
    }

    fn held(l: &Locks, owner: Owner) -> Vec<(u64, u64, bool)> {
        let g = l.inner.lock().unwrap();
        let Some(f) = g.files.get(&5) else { return Vec::new() };
        f.posix.iter().filter(|x| x.owner == owner).map(|x| (x.start, x.end, x.write)).collect()
    }

    async fn set(l: &Locks, r: LockRequest) -> Result<bool, ErrorCode> {
        l.set(&r, Duration::ZERO).await.map(|held| !held.is_empty())
    }

    #[tokio::test]
    async fn ranges_conflict_split_and_merge_like_the_kernel() {
        let l = Locks::default();
        assert_eq!(set(&l, req(A, 0, 9, LockKind::Write)).await, Ok(true));
        assert_eq!(set(&l, req(B, 10, 19, LockKind::Write)).await, Ok(true), "disjoint ranges coexist");
        assert_eq!(set(&l, req(B, 5, 12, LockKind::Read)).await, Err(ErrorCode::WouldBlock));
        assert_eq!(l.get(5, B, 5, 5, LockKind::Read).unwrap().map(|i| (i.start, i.end, i.pid)), Some((0, 9, 1)));
        assert_eq!(l.get(5, A, 5, 5, LockKind::Write), Ok(None), "own locks never conflict");
        // Unlocking the middle splits A's lock.
        assert_eq!(set(&l, req(A, 3, 6, LockKind::Unlock)).await, Ok(true));
        assert_eq!(held(&l, A), vec![(0, 2, true), (7, 9, true)]);
        assert_eq!(set(&l, req(B, 3, 6, LockKind::Write)).await, Ok(true), "the middle is free");
        assert_eq!(set(&l, req(B, 2, 2, LockKind::Write)).await, Err(ErrorCode::WouldBlock));
        // Adjacent same-kind ranges merge; a different kind splits and replaces.
        assert_eq!(set(&l, req(C, 100, 109, LockKind::Read)).await, Ok(true));
        assert_eq!(set(&l, req(C, 110, 119, LockKind::Read)).await, Ok(true));
        assert_eq!(held(&l, C), vec![(100, 119, false)]);
        assert_eq!(set(&l, req(C, 105, 106, LockKind::Write)).await, Ok(true));
        assert_eq!(held(&l, C), vec![(100, 104, false), (105, 106, true), (107, 119, false)]);
        assert_eq!(set(&l, req(C, 100, 119, LockKind::Read)).await, Ok(true));
        assert_eq!(held(&l, C), vec![(100, 119, false)], "a read over everything merges it back");
        assert_eq!(set(&l, req(A, 101, 101, LockKind::Read)).await, Ok(true), "readers share");
        assert_eq!(set(&l, req(C, 0, u64::MAX, LockKind::Unlock)).await, Ok(false));
        // To end of file: the largest end merges without overflow.
        assert_eq!(set(&l, req(C, 200, u64::MAX, LockKind::Read)).await, Ok(true));
        assert_eq!(set(&l, req(C, 150, 199, LockKind::Read)).await, Ok(true));
        assert_eq!(held(&l, C), vec![(150, u64::MAX, false)]);
    }

    #[tokio::test]
    async fn flock_and_byte_range_locks_do_not_see_each_other() {
        let l = Locks::default();
        let whole = |owner, kind, flock| LockRequest { flock, ..req(owner, 0, u64::MAX, kind) };
        assert_eq!(set(&l, whole(A, LockKind::Write, true)).await, Ok(true));
        assert_eq!(set(&l, whole(B, LockKind::Write, false)).await, Ok(true));
        assert_eq!(set(&l, whole(B, LockKind::Read, true)).await, Err(ErrorCode::WouldBlock));
        l.drop_conn(1);
        assert_eq!(set(&l, whole(B, LockKind::Read, true)).await, Ok(true), "gone with A's connection");
        assert_eq!(set(&l, whole(A, LockKind::Read, false)).await, Ok(false), "nothing for a closed connection");
        assert_eq!(l.get(5, C, 0, 0, LockKind::Write).unwrap().map(|i| i.pid), Some(2), "only B's lock");
    }

    #[tokio::test]
    async fn a_waiter_gets_the_lock_when_it_is_released() {
        let l = std::sync::Arc::new(Locks::default());
        assert_eq!(set(&l, req(A, 0, 9, LockKind::Write)).await, Ok(true));
        let l2 = l.clone();
        let waiter = tokio::spawn(async move {
            l2.set(&req(B, 5, 5, LockKind::Write), Duration::from_secs(5)).await.map(|h| !h.is_empty())
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        assert_eq!(set(&l, req(A, 0, 9, LockKind::Unlock)).await, Ok(false));
        assert_eq!(waiter.await.unwrap(), Ok(true));
        let timed = l.set(&req(A, 5, 5, LockKind::Read), Duration::from_millis(50)).await.map(|h| !h.is_empty());
        assert_eq!(timed, Err(ErrorCode::WouldBlock), "a wait ends");
    }

    #[tokio::test]
    async fn a_wait_closing_a_cycle_is_a_deadlock() {
        let l = std::sync::Arc::new(Locks::default());
        assert_eq!(set(&l, req(A, 1, 1, LockKind::Write)).await, Ok(true));
        assert_eq!(set(&l, req(B, 2, 2, LockKind::Write)).await, Ok(true));
        assert_eq!(set(&l, req(C, 3, 3, LockKind::Write)).await, Ok(true));
        let l2 = l.clone();
        // A waits for B, B waits for C; C asking for A's byte closes the cycle.
        let a = tokio::spawn(async move {
            l2.set(&req(A, 2, 2, LockKind::Write), Duration::from_secs(5)).await.map(|h| !h.is_empty())
        });
        let l3 = l.clone();
        let b = tokio::spawn(async move {
            l3.set(&req(B, 3, 3, LockKind::Write), Duration::from_secs(5)).await.map(|h| !h.is_empty())
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            l.set(&req(C, 1, 1, LockKind::Write), Duration::from_secs(1)).await.map(|h| !h.is_empty()),
            Err(ErrorCode::Deadlock)
        );
        assert_eq!(set(&l, req(C, 3, 3, LockKind::Unlock)).await, Ok(false));
        assert_eq!(b.await.unwrap(), Ok(true));
        assert_eq!(set(&l, req(B, 0, 10, LockKind::Unlock)).await, Ok(false));
        assert_eq!(a.await.unwrap(), Ok(true));
    }

    #[tokio::test]
    async fn after_a_restart_only_reclaims_are_granted_until_the_grace_period_ends() {
        let l = Locks::new(Duration::from_millis(300));
        let held = |kind, start, end| LockInfo { kind, start, end, pid: 4 };
        let a = OwnedLocks { ino: 5, owner: 7, flock: false, held: vec![held(LockKind::Write, 0, 9)] };
        let b = OwnedLocks { ino: 5, owner: 8, flock: false, held: vec![held(LockKind::Read, 5, 5)] };
        let c = OwnedLocks { ino: 5, owner: 9, flock: true, held: vec![held(LockKind::Read, 0, u64::MAX)] };
        assert_eq!(set(&l, req(B, 20, 29, LockKind::Write)).await, Err(ErrorCode::Grace));
        assert_eq!(l.get(5, B, 0, 0, LockKind::Read), Err(ErrorCode::Grace));
        assert_eq!(l.reclaim(1, &[a, b.clone()]), vec![true, false], "a conflicting reclaim is refused");
        assert_eq!(l.reclaim(2, &[b.clone(), c.clone()]), vec![false, true]);
        assert_eq!(set(&l, req(A, 0, 9, LockKind::Unlock)).await, Ok(false), "unlocks go through");
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(l.reclaim(3, &[b]), vec![false], "no reclaim after the grace period");
        assert_eq!(set(&l, req(B, 20, 29, LockKind::Write)).await, Ok(true));
        assert_eq!(l.get(5, C, 25, 25, LockKind::Read).unwrap().map(|i| i.pid), Some(2));
    }
}
