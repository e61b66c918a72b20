//! Leases and recalls: what keeps clients' caches and buffered writes coherent.
//!
//! Every answer that tells a client about an inode (its attributes, data map, or for a
//! directory its entries) grants that client's connection a read lease on the inode for
//! [`LEASE`]; the lease is recorded *before* the request runs, so a change that commits
//! meanwhile finds it. A change made by one client is answered only after every other
//! client holding a lease on what it changed has been told to forget it
//! ([`Callback::Recall`]) and has answered, or can no longer use its lease.
//!
//! A client buffers writes to a file only under its exclusive write lease (`WriteLease`,
//! or creating the file open). Any other client's request that reads or changes that file
//! first recalls the write lease ([`Leases::recall_writers`]): the holder commits what it
//! buffered and releases the lease before the request runs. A holder that does not answer
//! while the server still hears from it loses the lease: its epoch is ended in the database
//! (`MetaService::recall_writers`), so its later commits are refused.
//!
//! A client keeps cached state for at most its cache lifetime (10 s, inside a lease), and
//! only while its last answered request was sent less than [`LIVENESS`] ago (it sends
//! `Renew` when otherwise idle). So a holder that does not answer a recall (stopped,
//! partitioned) is waited for only until [`LIVENESS`] after the server last heard from it.

use cairn_net::Peer;
use cairn_proto::Ino;
use cairn_proto::callback::{Callback, CallbackResponse};
use dashmap::DashMap;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// How long a read lease lasts: longer than any client cache lifetime (10 s).
pub(crate) const LEASE: Duration = Duration::from_secs(60);
/// A client stops using its caches once its last answered request was sent this long ago
/// (the client uses a shorter limit: see `cairn-client`'s `SESSION_FRESH`).
pub(crate) const LIVENESS: Duration = Duration::from_secs(5);
/// The longest a write-lease holder that stays alive may take to commit what it buffered
/// when recalled (its stores and commit have their own timeouts, well below this): past it,
/// the lease ends anyway and the holder's later commit fails with EIO, so a holder stuck on
/// a hung chunk server cannot stall other clients' access to the file for longer.
const WRITE_RECALL_MAX: Duration = Duration::from_secs(60);

/// Read and write leases by inode, and the sessions that can be called back.
#[derive(Default)]
pub(crate) struct Leases {
    /// Client connections, by connection id, and when each last sent a request.
    sessions: DashMap<usize, (Peer, Instant)>,
    /// Per inode, the connections holding a read lease on it and when it was granted.
    readers: DashMap<Ino, Vec<(usize, Instant)>>,
    /// Per file, the write lease and its state.
    writers: DashMap<Ino, Writer>,
    /// Woken when a write lease stops being busy (recalled, granted or dropped).
    settled: tokio::sync::Notify,
    /// Recalls started so far (see [`Leases::recalls`]).
    recalls: std::sync::atomic::AtomicU64,
}

impl Leases {
    /// Notes that a client is alive (it sent a request). A request of a connection that has
    /// ended may still run after [`Leases::disconnected`] (a mount sends its last `Close`s
    /// and unmounts): it must not register the connection again, which then stays a session
    /// for good, keeps every other client from being alone (no solo lease) and draws recalls
    /// that cannot be answered. So a new session is checked after its insertion: a
    /// connection that ended before it is seen closed here, one that ends after it is removed
    /// by `disconnected`. A session still present cannot have been removed yet, so a request
    /// of a known session (every request but a connection's first) costs no check.
    pub(crate) fn seen(&self, peer: &Peer) {
        if !peer.is_client {
            return;
        }
        let new = match self.sessions.entry(peer.conn_id) {
            dashmap::Entry::Occupied(mut s) => {
                s.get_mut().1 = Instant::now();
                false
            }
            dashmap::Entry::Vacant(s) => {
                s.insert((peer.clone(), Instant::now()));
                true
            }
        };
        if new && peer.is_closed() {
            self.sessions.remove(&peer.conn_id);
        }
    }

    /// Grants `peer` read leases on `inos` (clients only: servers cache nothing).
    pub(crate) fn grant(&self, peer: &Peer, inos: &[Ino]) {
        if !peer.is_client || inos.is_empty() {
            return;
        }
        let now = Instant::now();
        for ino in inos {
            let mut holders = self.readers.entry(*ino).or_default();
            holders.retain(|(c, at)| *c != peer.conn_id && at.elapsed() < LEASE);
            holders.push((peer.conn_id, now));
        }
    }

    /// Forgets a connection that ended: it can no longer be called back, and its leases are
    /// void (its client drops its caches when it notices).
    pub(crate) fn disconnected(&self, conn: usize) {
        self.sessions.remove(&conn);
        // Its read leases could only draw recalls that fail at once ("the client is gone").
        self.readers.retain(|_, holders| {
            holders.retain(|(c, _)| *c != conn);
            !holders.is_empty()
        });
        // Its write leases are forgotten, not ended: if nobody writes the files meanwhile,
        // the client may still commit under them once reconnected (see `reclaim_writer`).
        self.writers.retain(|_, w| w.conn != conn);
        self.settled.notify_waiters();
    }

    /// Who holds the write lease on `ino`, as seen by `asker`, and its epoch (0: being
    /// granted). A lease being recalled or granted to another is waited for first: the holder
    /// may ask again while it answers the recall, and must then get a new lease.
    pub(crate) async fn writer(&self, ino: Ino, asker: usize) -> Option<(usize, u64)> {
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            match self.writers.get(&ino).map(|w| *w) {
                Some(w) if w.busy && w.conn != asker => settled.await,
                Some(w) if w.busy && w.epoch != GRANTING => settled.await,
                other => return other.map(|w| (w.conn, w.epoch)),
            }
        }
    }

    /// Whether `conn` holds the write lease on `ino` (granted, not just reserved).
    pub(crate) fn holds_write(&self, ino: Ino, conn: usize) -> bool {
        self.writers.get(&ino).is_some_and(|w| w.conn == conn && w.epoch != GRANTING)
    }

    /// Reserves the write lease on `ino` for `conn` if nobody holds it; then only `conn` may
    /// be granted it ([`Leases::set_writer`]) or give it up ([`Leases::unreserve`]).
    pub(crate) fn reserve(&self, ino: Ino, conn: usize) -> bool {
        let w = *self.writers.entry(ino).or_insert(Writer { conn, epoch: GRANTING, busy: true });
        w.conn == conn && w.epoch == GRANTING
    }

    /// Gives up a reservation that could not be granted.
    pub(crate) fn unreserve(&self, ino: Ino, conn: usize) {
        self.writers.remove_if(&ino, |_, w| w.conn == conn && w.epoch == GRANTING);
        self.settled.notify_waiters();
    }

    /// Records a write lease granted to `conn`.
    pub(crate) fn set_writer(&self, ino: Ino, conn: usize, epoch: u64) {
        self.writers.insert(ino, Writer { conn, epoch, busy: false });
        self.settled.notify_waiters();
    }

    /// Records again a write lease that a commit just proved current, if nobody holds one.
    pub(crate) fn reclaim_writer(&self, ino: Ino, conn: usize, epoch: u64) {
        self.writers.entry(ino).or_insert(Writer { conn, epoch, busy: false });
    }

    /// Forgets `conn`'s write lease on `ino` (its last handle was closed).
    pub(crate) fn drop_writer(&self, ino: Ino, conn: usize) {
        if self.writers.remove_if(&ino, |_, w| w.conn == conn && !w.busy).is_some() {
            self.settled.notify_waiters();
        }
    }

    /// Has every other connection holding a write lease on one of `inos` commit its buffered
    /// writes and release the lease. Waits for each holder as long as it stays alive (a large
    /// buffer takes a while to store), and no longer than [`LIVENESS`] after it was last
    /// heard from. With `next`, a recalled lease is reserved for that connection, which asked
    /// for it: otherwise a busy writer would ask again first, every time. Returns whether any
    /// lease was recalled, and the leases whose holders did not answer, which the caller must
    /// end (then [`Leases::forget_writers`]) so their later commits are refused.
    ///
    /// Never waits while it has leases marked busy: a lease another request is recalling is
    /// waited for only between rounds, so two requests cannot wait for each other.
    pub(crate) async fn recall_writers(
        &self,
        from: usize,
        inos: &[Ino],
        next: Option<usize>,
    ) -> (bool, Vec<(Ino, u64)>) {
        if self.writers.is_empty() {
            return (false, Vec::new());
        }
        let mut todo = inos.to_vec();
        todo.sort_unstable();
        todo.dedup();
        let (mut recalled, mut lost) = (false, Vec::new());
        while !todo.is_empty() {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            let mut calls: HashMap<usize, Vec<(Ino, u64)>> = HashMap::new();
            let mut busy = Vec::new();
            for ino in todo.drain(..) {
                // The holder's own requests go on: one may be the commit a recall waits for.
                let Some(mut w) = self.writers.get_mut(&ino) else { continue };
                if w.conn == from {
                    continue;
                }
                if w.busy {
                    busy.push(ino);
                    continue;
                }
                w.busy = true;
                calls.entry(w.conn).or_default().push((ino, w.epoch));
            }
            if !calls.is_empty() {
                recalled = true;
                self.recalls.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                lost.extend(self.recall_writes(calls, next).await);
                self.settled.notify_waiters();
            } else if !busy.is_empty() {
                settled.await;
            }
            todo = busy;
        }
        (recalled, lost)
    }

    /// Sends each holder its [`Callback::RecallWrites`] and, once it answered (or stopped
    /// answering), passes each lease on to `next` or drops it; returns those not answered.
    async fn recall_writes(&self, calls: HashMap<usize, Vec<(Ino, u64)>>, next: Option<usize>) -> Vec<(Ino, u64)> {
        let recalls = calls.into_iter().map(|(conn, leases)| async move {
            let deadline = Some(Instant::now() + WRITE_RECALL_MAX);
            let answered = self.call_back(conn, Callback::RecallWrites { leases: leases.clone() }, deadline).await;
            // Counted again now that the holder committed, before its lease goes: a request
            // that read one of these files while the recall was under way (started by another
            // request, before it counted) sees the count move and reads again.
            self.recalls.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            let mut lost = Vec::new();
            for (ino, epoch) in leases {
                let ours = |w: &Writer| (w.conn, w.epoch) == (conn, epoch);
                match next {
                    Some(to) => self.writers.alter(&ino, |_, w| match ours(&w) {
                        true => Writer { conn: to, epoch: GRANTING, busy: true },
                        false => w,
                    }),
                    None => drop(self.writers.remove_if(&ino, |_, w| ours(w))),
                }
                if let Err(e) = &answered {
                    warn!(conn, ino, "a write lease holder did not answer a recall: {e}");
                    lost.push((ino, epoch));
                }
            }
            lost
        });
        futures::future::join_all(recalls).await.into_iter().flatten().collect()
    }

    /// Forgets leases just ended in the database: a late commit of their holder may have
    /// recorded them again meanwhile (see [`Leases::reclaim_writer`]).
    pub(crate) fn forget_writers(&self, lost: &[(Ino, u64)]) {
        for (ino, epoch) in lost {
            self.writers.remove_if(ino, |_, w| w.epoch == *epoch && !w.busy);
        }
    }

    /// Sends `req` to client `conn` and waits for its answer while the client stays alive
    /// (it is heard from at least every [`LIVENESS`]) and, if given, until `deadline`.
    pub(crate) async fn call_back(&self, conn: usize, req: Callback, deadline: Option<Instant>) -> Result<(), String> {
        let Some(peer) = self.sessions.get(&conn).map(|s| s.0.clone()) else {
            return Err("the client is gone".to_string());
        };
        let call = peer.call::<_, CallbackResponse>(&req, Duration::from_secs(3600));
        tokio::pin!(call);
        loop {
            tokio::select! {
                r = &mut call => return r.map(|_| ()).map_err(|e| e.to_string()),
                _ = tokio::time::sleep(LIVENESS / 5) => {
                    let seen = self.sessions.get(&conn).map(|s| s.1);
                    if seen.is_none_or(|at| at.elapsed() >= LIVENESS) {
                        return Err("the client stopped answering".to_string());
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err("it did not answer in time".to_string());
                    }
                }
            }
        }
    }

    /// Drops expired leases (run now and then, so the table holds only recent readers).
    pub(crate) fn expire(&self) {
        self.readers.retain(|_, holders| {
            holders.retain(|(_, at)| at.elapsed() < LEASE);
            !holders.is_empty()
        });
    }

    /// Client connections, inodes with read leases and files with a write lease, for metrics.
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        (self.sessions.len(), self.readers.len(), self.writers.len())
    }

    /// Whether `conn` is the only client connected.
    pub(crate) fn alone(&self, conn: usize) -> bool {
        self.sessions.len() == 1 && self.sessions.contains_key(&conn)
    }

    /// Whether more than one client is connected (only then can a change need a recall).
    pub(crate) fn shared(&self) -> bool {
        self.sessions.len() > 1
    }

    /// How many recalls have started, plus how many write recalls were answered: a read whose
    /// leases are granted only after it ran (the inodes a lookup or listing finds) is run again
    /// if this moved meanwhile, since a change may have committed between its read and its
    /// grant without recalling it, or a recall started before it may have made its holder
    /// commit after it read.
    pub(crate) fn recalls(&self) -> u64 {
        self.recalls.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Takes every other live client's lease on `inodes` and on the directories of
    /// `entries`, tells each holder what to forget, and returns once all have answered or
    /// their leases have run out.
    pub(crate) async fn recall(&self, from: usize, inodes: Vec<Ino>, entries: Vec<(Ino, Vec<u8>)>) {
        self.recalls.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if self.readers.is_empty() {
            return;
        }
        let mut calls: HashMap<usize, Recall> = HashMap::new();
        // Takes the other holders' live leases on `ino` and has `add` note it in their calls.
        let mut take = |ino: Ino, add: &dyn Fn(&mut Recall)| {
            let Some(mut holders) = self.readers.get_mut(&ino) else { return };
            let (theirs, mine): (Vec<_>, Vec<_>) = holders.drain(..).partition(|(c, _)| *c != from);
            *holders = mine;
            for (conn, at) in theirs.into_iter().filter(|(_, at)| at.elapsed() < LEASE) {
                let call = calls.entry(conn).or_insert_with(|| Recall::new(at + LEASE));
                call.until = call.until.max(at + LEASE);
                add(call);
            }
        };
        let mut names: HashMap<Ino, Vec<Vec<u8>>> = HashMap::new();
        for (dir, name) in entries {
            names.entry(dir).or_default().push(name);
        }
        // Directories whose names changed first: their holders forget them whole anyway.
        for (dir, names) in names {
            take(dir, &|call| call.entries.extend(names.iter().map(|n| (dir, n.clone()))));
        }
        for ino in inodes {
            take(ino, &|call| call.inodes.push(ino));
        }
        let recalls = calls.into_iter().map(|(conn, call)| async move {
            let req = Callback::Recall { inodes: call.inodes, entries: call.entries };
            match self.call_back(conn, req, Some(call.until)).await {
                Ok(()) => debug!(conn, "recall answered"),
                // Its lease has run out meanwhile: it can no longer use what it had.
                Err(e) => warn!(conn, "a client did not answer a recall: {e}"),
            }
        });
        futures::future::join_all(recalls).await;
    }
}

/// The epoch of a write lease reserved for a connection and not granted yet.
const GRANTING: u64 = 0;

/// A file's write lease: who holds it (or has it reserved), its epoch, and whether it is
/// busy: being recalled, or reserved and being granted.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Writer {
    conn: usize,
    epoch: u64,
    busy: bool,
}

/// What one holder is told to forget, and until when its lease could still be used.
struct Recall {
    inodes: Vec<Ino>,
    entries: Vec<(Ino, Vec<u8>)>,
    until: Instant,
}

impl Recall {
    fn new(until: Instant) -> Recall {
        Recall { inodes: Vec::new(), entries: Vec::new(), until }
    }
}
