//! Files' attributes as this client's last request about them left them, for the getattr
//! the kernel sends after every read (a read drops the atime it caches) and before every
//! chown (to recompute the mode): `tar c` and `tar x` would otherwise wait for the server
//! once per file. Kept only for the rest of the attribute TTL, as the kernel keeps its own,
//! and dropped whenever this client changes the inode.

use crate::Result;
use cairn_proto::meta::{MetaRequest, MetaResponse};
use cairn_proto::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub(crate) struct FileAttrs {
    ttl: Duration,
    cache: moka::sync::Cache<Ino, (Instant, Attr)>,
    /// Answers to requests sent before this epoch are not kept: an unlink or rename without
    /// an answer, or a lost connection, may have changed any inode since.
    unnamed_change: AtomicU64,
}

impl FileAttrs {
    pub(crate) fn new(ttl: Duration) -> FileAttrs {
        FileAttrs {
            ttl,
            cache: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(ttl).build(),
            unnamed_change: AtomicU64::new(0),
        }
    }

    /// Forgets what `req` may change; called when it is sent (without `answer`) and again
    /// when it is answered, with a fresh epoch each time. An unlink or rename changes the
    /// link count or ctime of inodes it does not name: its answer names them, and without
    /// an answer any file may have changed.
    pub(crate) fn forget(&self, req: &MetaRequest, answer: Option<&Result<MetaResponse>>, epoch: u64) {
        for ino in crate::cached_changes(req) {
            self.cache.invalidate(&ino);
        }
        match answer {
            Some(Ok(MetaResponse::Changed { unnamed, .. })) => {
                unnamed.iter().for_each(|ino| self.cache.invalidate(ino))
            }
            Some(Err(e))
                if e.unanswered() && matches!(req, MetaRequest::Unlink { .. } | MetaRequest::Rename { .. }) =>
            {
                self.drop_all(epoch)
            }
            _ => {}
        }
    }

    /// Keeps a file's attributes from the answer to a request sent at `sent_at` (epoch
    /// `sent`). The caller has checked that no other request of this client changed the
    /// inode since; an unlink or rename may have, without naming it.
    pub(crate) fn keep(&self, a: &Attr, sent: u64, sent_at: Instant) {
        if a.kind == FileKind::File && self.unnamed_change.load(Ordering::Acquire) <= sent {
            self.cache.insert(a.ino, (sent_at, a.clone()));
        }
    }

    /// Forgets `ino` (another client changed it).
    pub(crate) fn drop(&self, ino: Ino) {
        self.cache.invalidate(&ino);
    }

    /// Forgets everything, and answers to requests sent before `epoch`.
    pub(crate) fn drop_all(&self, epoch: u64) {
        self.unnamed_change.fetch_max(epoch, Ordering::AcqRel);
        self.cache.invalidate_all();
    }

    /// The kept attributes of `ino` and how much of their TTL is left.
    pub(crate) fn get(&self, ino: Ino) -> Option<(Attr, Duration)> {
        let (at, a) = self.cache.get(&ino)?;
        let left = self.ttl.checked_sub(at.elapsed())?;
        Some((a, left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::meta::SetAttrs;

    fn attr(ino: Ino, kind: FileKind) -> Attr {
        crate::test_attr(ino, kind, 1)
    }

    #[test]
    fn kept_only_while_this_client_changed_nothing_they_describe() {
        let ttl = Duration::from_secs(60);
        let f = FileAttrs::new(ttl);
        f.keep(&attr(5, FileKind::File), 1, Instant::now());
        f.keep(&attr(6, FileKind::Dir), 1, Instant::now());
        assert!(f.get(5).is_some_and(|(a, left)| a.ino == 5 && left <= ttl));
        assert!(f.get(6).is_none(), "directories are not kept here");

        // A chmod is sent: the kept attributes go.
        let chmod = MetaRequest::SetAttr {
            ino: 5,
            set: SetAttrs { perm: Some(0o600), ..Default::default() },
            caller: Default::default(),
        };
        f.forget(&chmod, None, 2);
        assert!(f.get(5).is_none());

        // An unlink changes the link count of an inode it does not name: its answer names it,
        // and only that one goes.
        f.keep(&attr(7, FileKind::File), 3, Instant::now());
        f.keep(&attr(9, FileKind::File), 3, Instant::now());
        let unlink = MetaRequest::Unlink { parent: 1, name: b"x".to_vec() };
        f.forget(&unlink, None, 4);
        assert!(f.get(7).is_some() && f.get(9).is_some());
        let answer = Ok(MetaResponse::Changed { attr: None, dirs: Vec::new(), unnamed: vec![7] });
        f.forget(&unlink, Some(&answer), 5);
        assert!(f.get(7).is_none());
        assert!(f.get(9).is_some());

        // Without an answer, everything goes, and answers to requests sent before it are not
        // kept.
        let lost = Err(crate::ClientError::new(ErrorCode::TimedOut, "no answer"));
        f.forget(&unlink, Some(&lost), 7);
        assert!(f.get(9).is_none());
        f.keep(&attr(8, FileKind::File), 6, Instant::now());
        assert!(f.get(8).is_none());
        f.keep(&attr(8, FileKind::File), 8, Instant::now());
        assert!(f.get(8).is_some());

        // An answered error means nothing changed.
        let refused = Err(crate::ClientError::new(ErrorCode::NotFound, "no such entry"));
        f.forget(&unlink, Some(&refused), 9);
        assert!(f.get(8).is_some());
    }

    #[test]
    fn given_out_only_for_the_rest_of_the_ttl() {
        let f = FileAttrs::new(Duration::from_secs(1));
        f.keep(&attr(5, FileKind::File), 1, Instant::now() - Duration::from_secs(2));
        assert!(f.get(5).is_none());
    }
}
