//! The solo lease: a client that is the volume's only client may answer namespace changes
//! (create, mkdir, unlink, rmdir, rename) itself and send them afterwards, in order and in
//! batches (`MetaRequest::Deferred`), as a local filesystem answers before its journal is
//! written. Nobody else can look, so nobody can see the difference; the first request of any
//! other client recalls the lease (`Callback::RecallSolo`) and runs only once the holder has
//! sent every change it answered.
//!
//! A holder whose connection ends keeps its lease *orphaned*: its changes still queued arrive
//! on its next connection, under the same epoch, before any other request of it (the client
//! sends nothing else first). Any other request, from any connection, ends an orphaned lease
//! at once, as there is nobody left to call back; deferred changes sent under an ended lease
//! are refused whole (`LeaseLost`).

use crate::leases::Leases;
use cairn_proto::callback::Callback;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tracing::{info, warn};

/// Who holds the solo lease.
struct Holder {
    conn: usize,
    epoch: u64,
    /// The number of the last deferred change applied (changes are numbered from 1).
    applied: u64,
    /// Being recalled: the holder sends what it deferred, and defers nothing more.
    recalling: bool,
    /// The holder's connection ended; its next one may still send what it deferred.
    orphaned: bool,
}

pub(crate) struct Solo {
    holder: Mutex<Option<Holder>>,
    /// Whether there is a holder, so that requests skip the lock when there is none.
    held: AtomicBool,
    /// Woken when a lease ends.
    ended: tokio::sync::Notify,
    next_epoch: AtomicU64,
}

impl Default for Solo {
    fn default() -> Solo {
        // Epochs never repeat across restarts of the server: a holder from before a restart
        // must not find its epoch current again.
        let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Solo {
            holder: Mutex::new(None),
            held: AtomicBool::new(false),
            ended: tokio::sync::Notify::new(),
            next_epoch: AtomicU64::new(start.as_nanos() as u64),
        }
    }
}

impl Solo {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Holder>> {
        self.holder.lock().expect("solo lease")
    }

    /// Grants the lease to `conn` if it is the only client connected (`alone`), or holds it
    /// already. `alone` is checked under the lease's lock, which every other client's request
    /// takes after it is counted as connected: either this grant sees that client, or that
    /// request sees the lease and recalls it.
    pub(crate) fn grant(&self, conn: usize, alone: impl FnOnce() -> bool) -> Option<u64> {
        let mut holder = self.lock();
        match &*holder {
            Some(h) if h.conn == conn && !h.recalling && !h.orphaned => Some(h.epoch),
            Some(_) => None,
            None if alone() => {
                let epoch = self.next_epoch.fetch_add(1, Ordering::AcqRel);
                *holder = Some(Holder { conn, epoch, applied: 0, recalling: false, orphaned: false });
                self.held.store(true, Ordering::Release);
                Some(epoch)
            }
            None => None,
        }
    }

    /// Ends another connection's lease before a request of `conn` runs: recalls it from a
    /// live holder (which sends what it deferred first), waits for a recall in progress, or
    /// drops an orphaned one.
    pub(crate) async fn recall_for(&self, leases: &Leases, conn: usize) {
        if !self.held.load(Ordering::Acquire) {
            return;
        }
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let (holder, epoch) = {
                let mut guard = self.lock();
                let Some(h) = guard.as_mut() else { return };
                if h.conn == conn && !h.orphaned {
                    return;
                }
                if h.orphaned {
                    info!(epoch = h.epoch, "ending the solo lease of a client whose connection ended");
                    self.end(&mut guard);
                    return;
                }
                if h.recalling {
                    (None, h.epoch)
                } else {
                    h.recalling = true;
                    (Some(h.conn), h.epoch)
                }
            };
            let Some(holder) = holder else {
                ended.await;
                continue;
            };
            info!(holder, epoch, "another client connected: recalling the solo lease");
            if let Err(e) = leases.call_back(holder, Callback::RecallSolo { epoch }, None).await {
                warn!(holder, "the solo lease holder did not answer its recall: {e}");
            }
            let mut guard = self.lock();
            if guard.as_ref().is_some_and(|h| h.epoch == epoch) {
                self.end(&mut guard);
            }
            return;
        }
    }

    fn end(&self, holder: &mut Option<Holder>) {
        *holder = None;
        self.held.store(false, Ordering::Release);
        self.ended.notify_waiters();
    }

    /// Marks the lease of a connection that ended as orphaned.
    pub(crate) fn disconnected(&self, conn: usize) {
        if let Some(h) = self.lock().as_mut().filter(|h| h.conn == conn) {
            h.orphaned = true;
        }
    }

    /// Accepts deferred changes numbered from `first` under `epoch` from `conn`; returns how
    /// many of them were applied already (sent again after a lost answer), or `None` if the
    /// lease is not current.
    pub(crate) fn accept(&self, conn: usize, epoch: u64, first: u64) -> Option<u64> {
        let mut guard = self.lock();
        let h = guard.as_mut().filter(|h| h.epoch == epoch && (h.conn == conn || h.orphaned))?;
        h.conn = conn;
        Some(h.applied.saturating_sub(first.saturating_sub(1)))
    }

    /// Records that change `n` under `epoch` was applied.
    pub(crate) fn applied(&self, epoch: u64, n: u64) {
        if let Some(h) = self.lock().as_mut().filter(|h| h.epoch == epoch) {
            h.applied = h.applied.max(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_lone_client_gets_the_lease_and_only_its_current_epoch_is_accepted() {
        let solo = Solo::default();
        assert_eq!(solo.grant(1, || false), None, "another client is connected");
        let epoch = solo.grant(1, || true).expect("alone");
        assert_eq!(solo.grant(1, || false), Some(epoch), "held already");
        assert_eq!(solo.grant(2, || true), None, "held by another");
        assert_eq!(solo.accept(1, epoch + 1, 1), None, "not the current epoch");
        assert_eq!(solo.accept(2, epoch, 1), None, "not the holder's connection");
        assert_eq!(solo.accept(1, epoch, 1), Some(0));
        (1..=3).for_each(|n| solo.applied(epoch, n));
        assert_eq!(solo.accept(1, epoch, 2), Some(2), "changes 2 and 3 were applied already");
        assert_eq!(solo.accept(1, epoch, 4), Some(0));
    }

    #[tokio::test]
    async fn an_orphaned_lease_takes_its_holders_queue_on_a_new_connection_and_ends_at_any_other_request() {
        let (solo, leases) = (Solo::default(), Leases::default());
        let epoch = solo.grant(1, || true).unwrap();
        solo.disconnected(1);
        assert_eq!(solo.accept(7, epoch, 1), Some(0), "the holder, reconnected");
        solo.recall_for(&leases, 7).await;
        assert_eq!(solo.accept(7, epoch, 2), None, "ended by a request other than its queue");
        assert!(solo.grant(7, || true).is_some(), "a new lease");
    }
}
