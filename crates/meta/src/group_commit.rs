//! Group commit: commits that wait for the database writer at the same time are applied in
//! one transaction. Write-behind sends up to 64 commits at once from one client (`git clone`,
//! `tar x`: one per file closed), and one transaction each made the writer the metadata
//! server's bottleneck: each wrote the same table and index pages to the write-ahead log
//! again and took its own trip to SQLite's thread.

use crate::MetaService;
use crate::data::Commit;
use crate::error::{MetaError, Result};
use crate::store::{Batch, Returned, WriteGuard};
use cairn_proto::meta::SetAttrs;
use cairn_proto::*;
use tokio::sync::oneshot;

/// Commits applied in one transaction at most.
const GROUP_MAX: usize = 64;

/// What a commit that applied gives: the file's attributes and, if it is small, chunk 0's map.
pub(crate) type Committed = (Attr, Option<Vec<SliceRef>>);

/// Commits waiting for the writer.
#[derive(Default)]
pub(crate) struct CommitQueue {
    waiting: std::sync::Mutex<Vec<Queued>>,
    /// Commits applied in a transaction with others (a Prometheus counter).
    grouped: std::sync::atomic::AtomicU64,
}

impl CommitQueue {
    /// How many commits were applied in a transaction with others.
    pub(crate) fn grouped(&self) -> u64 {
        self.grouped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A commit waiting in the queue, with where to send what became of it.
struct Queued {
    ino: Ino,
    slices: Vec<NewSlice>,
    min_size: u64,
    durable: bool,
    lease: u64,
    written_at: Timestamp,
    attrs: Option<SetAttrs>,
    done: oneshot::Sender<Result<Option<Committed>>>,
}

impl Queued {
    fn commit(&self) -> Commit<'_> {
        Commit {
            slices: &self.slices,
            min_size: self.min_size,
            durable: self.durable,
            lease: self.lease,
            written_at: self.written_at,
            attrs: self.attrs.as_ref(),
        }
    }
}

impl MetaService {
    /// [`MetaService::commit_in`] for `commit` (with its attributes), in one transaction with
    /// the other commits that wait for the writer meanwhile: whichever of them gets the
    /// writer first applies them all.
    pub(crate) async fn commit_grouped(&self, ino: Ino, commit: &Commit<'_>) -> Result<Option<Committed>> {
        let (done, mut answer) = oneshot::channel();
        self.commits.waiting.lock().expect("commit queue lock").push(Queued {
            ino,
            slices: commit.slices.to_vec(),
            min_size: commit.min_size,
            durable: commit.durable,
            lease: commit.lease,
            written_at: commit.written_at,
            attrs: commit.attrs.cloned(),
            done,
        });
        loop {
            tokio::select! {
                biased;
                answered = &mut answer => {
                    return answered.map_err(|_| MetaError::fs(ErrorCode::Io, "a grouped commit was abandoned"))?;
                }
                w = self.store.write() => {
                    let mut w = w?;
                    let group: Vec<Queued> = {
                        let mut queue = self.commits.waiting.lock().expect("commit queue lock");
                        let n = queue.len().min(GROUP_MAX);
                        queue.drain(..n).collect()
                    };
                    self.apply_group(&mut w, group).await;
                }
            }
        }
    }

    /// Applies `group` in one transaction and answers each commit; if that fails, each alone,
    /// so that each gets its own answer.
    async fn apply_group(&self, w: &mut WriteGuard<'_>, group: Vec<Queued>) {
        if group.len() > 1 {
            let mut b = Batch::durable(group.iter().any(|q| q.durable));
            for q in &group {
                b.commit(q.ino, &q.commit(), q.attrs.as_ref());
            }
            if let Ok(done) = w.apply(b).await {
                let parts = done.split_commits();
                if parts.len() != group.len() {
                    // Applied, but whose rows are whose is unknown: never applied twice.
                    tracing::error!("a group of {} commits returned {} answers", group.len(), parts.len());
                }
                self.commits.grouped.fetch_add(group.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let unknown = || Err(MetaError::fs(ErrorCode::Io, "the database's answer to a commit is unreadable"));
                let mut parts = parts.into_iter().map(|p| committed(&p));
                let whole = parts.len() == group.len();
                for q in group {
                    let _ = q.done.send(parts.next().filter(|_| whole).unwrap_or_else(unknown));
                }
                return;
            }
        }
        for q in group {
            let answer = self.commit_in(w, q.ino, &q.commit(), q.attrs.as_ref()).await;
            let _ = q.done.send(answer);
        }
    }
}

/// What one commit's rows of a batch say (see [`Batch::commit`]): `None` if it applied nothing.
pub(crate) fn committed(done: &Returned) -> Result<Option<Committed>> {
    Ok(match done.attr()? {
        Some(a) => Some((a, done.first_map()?)),
        None => None,
    })
}
