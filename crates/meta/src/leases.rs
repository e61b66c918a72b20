//! Read leases and recalls: what keeps clients' caches coherent.
//!
//! Every answer that tells a client about an inode (its attributes, data map, or for a
//! directory its entries) grants that client's connection a read lease on the inode for
//! [`LEASE`]; the lease is recorded *before* the request runs, so a change that commits
//! meanwhile finds it. A change made by one client is answered only after every other
//! client holding a lease on what it changed has been told to forget it
//! ([`Callback::Recall`]) and has answered, or can no longer use its lease.
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

/// Read leases by inode, and the sessions that can be called back.
#[derive(Default)]
pub(crate) struct Leases {
    /// Client connections, by connection id, and when each last sent a request.
    sessions: DashMap<usize, (Peer, Instant)>,
    /// Per inode, the connections holding a read lease on it and when it was granted.
    readers: DashMap<Ino, Vec<(usize, Instant)>>,
    /// Recalls started so far (see [`Leases::recalls`]).
    recalls: std::sync::atomic::AtomicU64,
}

impl Leases {
    /// Notes that a client is alive (it sent a request).
    pub(crate) fn seen(&self, peer: &Peer) {
        if peer.is_client {
            self.sessions
                .entry(peer.conn_id)
                .and_modify(|s| s.1 = Instant::now())
                .or_insert((peer.clone(), Instant::now()));
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
    }

    /// Drops expired leases (run now and then, so the table holds only recent readers).
    pub(crate) fn expire(&self) {
        self.readers.retain(|_, holders| {
            holders.retain(|(_, at)| at.elapsed() < LEASE);
            !holders.is_empty()
        });
    }

    /// Whether more than one client is connected (only then can a change need a recall).
    pub(crate) fn shared(&self) -> bool {
        self.sessions.len() > 1
    }

    /// How many recalls have started: a read whose leases are granted only after it ran (the
    /// inodes a lookup or listing finds) is run again if this moved meanwhile, since a change
    /// may have committed between its read and its grant without recalling it.
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
        let recalls = calls.into_iter().filter_map(|(conn, call)| {
            let (peer, seen) = self.sessions.get(&conn)?.clone();
            Some(async move {
                let until = call.until.min(seen + LIVENESS);
                let wait = until.saturating_duration_since(Instant::now());
                let req = Callback::Recall { inodes: call.inodes, entries: call.entries };
                match peer.call::<_, CallbackResponse>(&req, wait).await {
                    Ok(_) => debug!(conn, "recall answered"),
                    // Its lease has run out meanwhile: it can no longer use what it had.
                    Err(e) => warn!(conn, remote = %peer.remote, "a client did not answer a recall: {e}"),
                }
            })
        });
        futures::future::join_all(recalls).await;
    }
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
