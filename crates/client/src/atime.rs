//! Access times. The kernel never updates atime on a FUSE mount (it marks FUSE inodes
//! `S_NOATIME`), so the client does, by the mount's rule, in the background: a read never
//! waits for it. Updates are gathered for a moment and sent together, so reading thousands of
//! files costs the metadata server a few transactions, not one each. Attributes fetched while
//! an update is pending already show it.

use crate::Client;
use cairn_proto::meta::MetaRequest;
use cairn_proto::*;
use dashmap::DashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// When reads update atime: the mount options `noatime`, `relatime` (Linux's default) and
/// `strictatime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AtimeMode {
    Never,
    #[default]
    Relative,
    Always,
}

/// relatime also updates an atime that is this old, so it stays roughly current.
const RELATIME_MAX_AGE_SECS: i64 = 24 * 3600;
/// How long updates are gathered before they are sent.
const BATCH_DELAY: Duration = Duration::from_millis(200);
/// Updates sent in one request at most; a fuller batch goes at once.
const BATCH_MAX: usize = 1024;

pub(crate) struct Atimes {
    mode: AtimeMode,
    diratime: bool,
    /// Last known (atime, mtime, ctime) per inode, from attributes the server sent.
    known: moka::sync::Cache<Ino, (Timestamp, Timestamp, Timestamp)>,
    /// Updates not answered yet.
    pending: DashMap<Ino, Timestamp>,
    /// Updates not sent yet, in order.
    queue: Mutex<Vec<(Ino, Timestamp)>>,
}

impl Atimes {
    pub(crate) fn new(mode: AtimeMode, diratime: bool, ttl: Duration) -> Atimes {
        Atimes {
            mode,
            diratime,
            known: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(ttl).build(),
            pending: DashMap::new(),
            queue: Mutex::new(Vec::new()),
        }
    }

    /// Shows in `a` an update this client made (in flight or done: cached attributes read
    /// before it are not dropped for it), and remembers `a`'s times.
    pub(crate) fn note(&self, a: &mut Attr) {
        if self.mode == AtimeMode::Never {
            return;
        }
        if let Some(t) = self.pending.get(&a.ino) {
            a.atime = a.atime.max(*t);
        }
        if let Some((t, _, _)) = self.known.get(&a.ino) {
            a.atime = a.atime.max(t);
        }
        self.known.insert(a.ino, (a.atime, a.mtime, a.ctime));
    }

    /// An explicit atime change (utimes) wins over updates in flight.
    pub(crate) fn forget(&self, ino: Ino) {
        self.pending.remove(&ino);
        self.known.invalidate(&ino);
    }

    /// The new atime if a read of `ino` now must update it.
    fn due(&self, ino: Ino, dir: bool) -> Option<Timestamp> {
        if self.mode == AtimeMode::Never || (dir && !self.diratime) {
            return None;
        }
        let now = Timestamp::now();
        if self.mode == AtimeMode::Relative
            && let Some((atime, mtime, ctime)) = self.known.get(&ino)
            && atime > mtime
            && atime > ctime
            && now.secs - atime.secs < RELATIME_MAX_AGE_SECS
        {
            return None;
        }
        self.pending.insert(ino, now);
        if let Some((_, mtime, ctime)) = self.known.get(&ino) {
            self.known.insert(ino, (now, mtime, ctime));
        }
        Some(now)
    }
}

impl Client {
    /// Records a read of `ino` (a file read or a directory listing) by the mount's atime rule.
    pub(crate) fn accessed(self: &Arc<Self>, ino: Ino, dir: bool) {
        if self.flags_of(ino) & inode_flags::NOATIME != 0 {
            return;
        }
        let Some(atime) = self.atimes.due(ino, dir) else { return };
        let queued = {
            let mut q = self.atimes.queue.lock().expect("atime queue lock");
            q.push((ino, atime));
            q.len()
        };
        // The first update of a batch schedules its sending; a full batch goes at once.
        if queued == 1 || queued == BATCH_MAX {
            let client = self.clone();
            tokio::spawn(async move {
                if queued == 1 {
                    tokio::time::sleep(BATCH_DELAY).await;
                }
                client.send_atimes().await;
            });
        }
    }

    /// Sends the queued atime updates now (also before the mount ends, so none is lost).
    pub async fn send_atimes(&self) {
        let times = std::mem::take(&mut *self.atimes.queue.lock().expect("atime queue lock"));
        if times.is_empty() {
            return;
        }
        for batch in times.chunks(BATCH_MAX) {
            if let Err(e) = self.call_empty(MetaRequest::Touch { times: batch.to_vec() }).await {
                tracing::debug!(error = %e, "atime update failed");
            }
            for (ino, atime) in batch {
                self.atimes.pending.remove_if(ino, |_, t| t == atime);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(atime: i64, mtime: i64) -> Attr {
        let ts = |secs| Timestamp { secs, nanos: 0 };
        Attr {
            atime: ts(atime),
            mtime: ts(mtime),
            ctime: ts(mtime),
            crtime: ts(mtime),
            ..crate::test_attr(7, FileKind::File, 1)
        }
    }

    #[test]
    fn relatime_updates_only_an_atime_not_after_mtime_or_a_day_old() {
        let now = Timestamp::now().secs;
        let a = Atimes::new(AtimeMode::Relative, true, Duration::from_secs(60));
        a.note(&mut attr(now - 10, now - 10));
        assert!(a.due(7, false).is_some(), "atime == mtime: first read updates");
        assert!(a.due(7, false).is_none(), "atime now after mtime: no update");
        a.forget(7);
        a.note(&mut attr(now - RELATIME_MAX_AGE_SECS - 5, now - RELATIME_MAX_AGE_SECS - 10));
        assert!(a.due(7, false).is_some(), "a day-old atime is refreshed");
    }

    #[test]
    fn strictatime_always_updates_noatime_never_and_nodiratime_spares_directories() {
        let now = Timestamp::now().secs;
        let strict = Atimes::new(AtimeMode::Always, false, Duration::from_secs(60));
        strict.note(&mut attr(now, now - 100));
        assert!(strict.due(7, false).is_some());
        assert!(strict.due(7, false).is_some());
        assert!(strict.due(7, true).is_none(), "nodiratime");
        let never = Atimes::new(AtimeMode::Never, true, Duration::from_secs(60));
        assert!(never.due(7, false).is_none());
    }

    #[test]
    fn attributes_fetched_during_an_update_show_it() {
        let a = Atimes::new(AtimeMode::Always, true, Duration::from_secs(60));
        let sent = a.due(7, false).unwrap();
        let mut old = attr(1, 1);
        a.note(&mut old);
        assert_eq!(old.atime, sent);
    }
}
