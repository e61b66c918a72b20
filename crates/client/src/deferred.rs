//! Namespace changes answered here and sent afterwards, under the solo lease (see
//! `cairn-meta`'s `solo`): while this client is the volume's only client, a create, mkdir,
//! unlink, rmdir, rename or directory chmod/chown/utimes it can decide from what it knows for
//! certain (the directory's complete listing and its attributes) is answered at once and
//! queued, as a local filesystem answers before its journal is written. A background task sends the queue in order, one
//! batch at a time (`MetaRequest::Deferred`), so a run of changes costs a round trip per batch
//! instead of one per change. Opens of files a directory listing described, unchanged since,
//! are answered here too, their registrations queued the same way (`local_open`).
//!
//! Every other request to the metadata server waits until the queued changes that concern
//! what it reads or changes were applied (`drain_for`), so the server never answers from an
//! older state than this client showed. Another
//! client's arrival recalls the lease: this client stops deferring, sends its queue, then
//! answers, and the other client's request runs only then.
//!
//! A change the server refuses after this client answered it (which its checks here should
//! make impossible) is logged as an error and counted (`cairn stats`: `deferred.failed`), and
//! every cache is dropped so that what the server holds shows again.

use crate::Client;
use cairn_proto::meta::{DeferredChange, MetaRequest, MetaResponse, RenameMode, SetAttrs};
use cairn_proto::*;
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The lease is asked for again at most this often while refused. Short: right after a
/// remount, the first ask can come before the server saw the previous mount's connection end,
/// and every change until the next ask is synchronous (one peer run's `unlink` of 10,000 names
/// ran at 2,998/s instead of 11,000-14,000/s, probably so). A refused ask is one cheap request.
const ASK_EVERY: Duration = Duration::from_millis(250);
/// Inode numbers reserved at a time, and how few left start the next reservation.
const RESERVE: u32 = 4096;
const RESERVE_BELOW: u64 = 1024;
/// Changes sent in one request at most.
const BATCH: usize = 512;
/// Changes queued at most; past this, changes wait for the queue like any other request.
const MAX_QUEUED: usize = 8192;
/// Files with writes not committed past which creates are no longer answered here: each
/// create answered at once lets a writer run ahead of its commits, and an unmount or another
/// client's arrival would then wait for all of them. Files merely open (an `open(O_CREAT)` and
/// `close` loop, whose closes the kernel sends later) count only past `MAX_OPEN_FILES`.
const MAX_WRITTEN_FILES: usize = 256;
const MAX_OPEN_FILES: usize = 4096;
/// How long a batch is sent again over new connections before its changes count as lost.
const RESEND_FOR: Duration = Duration::from_secs(30);
/// How long registrations of opens and closes, which nothing waits for, gather before they
/// are sent: a loop reading small files would otherwise send a batch per file.
const GATHER: Duration = Duration::from_millis(20);

#[derive(Default)]
struct State {
    /// The solo lease's epoch while this client holds it and may defer changes.
    epoch: Option<u64>,
    /// Bumped whenever a lease ends here (recall, lost connection): a grant answered across
    /// that is not used.
    ended: u64,
    asked: Option<Instant>,
    inos: VecDeque<Range<Ino>>,
    reserving: bool,
    /// Changes not sent yet: (epoch, number within the epoch, change).
    queue: VecDeque<(u64, u64, DeferredChange)>,
    /// The last epoch granted here and the number of its last change (changes are numbered
    /// from 1 per epoch). Kept across the lease's end: the server may grant the same epoch
    /// again (an ask answered twice, a lost connection noticed late), and counting again
    /// from 1 under it would make it skip new changes as ones it applied.
    numbered: (u64, u64),
    /// Changes queued and changes answered (applied or refused) since the start.
    queued: u64,
    finished: u64,
    /// For each inode a change in the queue or in flight concerns (created, removed, moved,
    /// closed, or the directory it changed), the count of changes queued up to the last one.
    touched: HashMap<Ino, u64>,
    sending: bool,
}

impl State {
    /// The server granted the solo lease under `epoch` to an ask made when `ended` leases had
    /// ended here; it is used unless one ended since.
    fn granted(&mut self, epoch: u64, ended: u64) {
        if self.ended != ended {
            return;
        }
        tracing::debug!(epoch, "holding the solo lease: namespace changes are answered here");
        self.epoch = Some(epoch);
        if self.numbered.0 != epoch {
            self.numbered = (epoch, 0);
        }
    }
}

pub(crate) struct Deferred {
    /// Off on `dirsync` and `sync` mounts.
    enabled: bool,
    state: Mutex<State>,
    /// Woken when changes were answered.
    answered: tokio::sync::Notify,
    /// Woken when a request waits for queued changes: registrations gathering into a batch
    /// (see `send_deferred`) go at once.
    waited: tokio::sync::Notify,
}

impl Deferred {
    pub(crate) fn new(enabled: bool) -> Deferred {
        Deferred { enabled, state: Default::default(), answered: Default::default(), waited: Default::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("deferred changes")
    }
}

impl Client {
    /// Answers `req` here and queues it, if the solo lease is held and this client knows
    /// the outcome for certain; `None`: send it (after the queue). A change that could not be
    /// answered for want of its directory's listing, in a directory changed repeatedly (`rm`
    /// of many files, a flat `unlink` loop), lists the directory first and tries again: one
    /// listing then answers every change that follows.
    pub(crate) async fn defer_or_list(&self, req: &MetaRequest) -> Option<MetaResponse> {
        match self.defer(req) {
            Err(Some(dir)) => {
                self.list(dir).await;
                self.defer(req).ok()
            }
            answer => answer.ok(),
        }
    }

    /// [`Client::defer_or_list`] without the listing: `Err(Some(dir))` asks to list `dir`
    /// (claimed by [`Client::list_now`]) and try again.
    fn defer(&self, req: &MetaRequest) -> Result<MetaResponse, Option<Ino>> {
        use MetaRequest as R;
        let change = matches!(
            req,
            R::MakeNode { .. } | R::Unlink { .. } | R::Rmdir { .. } | R::Rename { .. } | R::SetAttr { .. }
        );
        // Only what could be deferred looks at the session: this runs before every request.
        let deferrable = change || matches!(req, R::Close { .. } | R::Open { .. });
        if !self.deferred.enabled || !deferrable || !self.check_session_fresh() {
            return Err(None);
        }
        let me = self.shared().ok_or(None)?;
        let mut s = self.deferred.lock();
        let Some(epoch) = s.epoch else {
            if !matches!(req, R::Close { .. }) && s.asked.is_none_or(|at| at.elapsed() >= ASK_EVERY) {
                s.asked = Some(Instant::now());
                let ended = s.ended;
                tokio::spawn(async move { me.ask_solo(ended).await });
            }
            return Err(None);
        };
        if s.queue.len() >= MAX_QUEUED {
            return Err(None);
        }
        let makes = matches!(req, R::MakeNode { .. });
        if makes && !s.reserving && s.inos.iter().map(|r| r.end - r.start).sum::<u64>() < RESERVE_BELOW {
            s.reserving = true;
            let client = me.clone();
            tokio::spawn(async move { client.reserve_inodes().await });
        }
        let at = Timestamp::now();
        let answer = match req {
            // A close needs no answer; it only has to stay behind the changes before it.
            R::Close { .. } if s.queue.is_empty() && !s.sending => return Err(None),
            R::Close { .. } => Some((0, MetaResponse::Empty)),
            // Files with writes not committed hold work the server has yet to see (their
            // closes may still be queued in the kernel): past a bound, creates wait for it.
            R::MakeNode { .. } if self.too_many_files() => None,
            R::MakeNode { .. } => {
                let ino = s.inos.front().map(|r| r.start);
                ino.and_then(|ino| Some((ino, self.local_make(req, ino, at)?)))
            }
            R::Open { ino } => self.local_open(*ino).map(|resp| (0, resp)),
            R::SetAttr { ino, set, .. } => self.local_setattr(*ino, set, at).map(|resp| (0, resp)),
            _ => self.local_change(req, at).map(|resp| (0, resp)),
        };
        let Some((ino, resp)) = answer else {
            drop(s);
            // Counted as a lookup in each directory it changes; after a few, the directory is
            // listed before the change is sent. Listed in the background instead, it would
            // race the changes sent meanwhile, and a listing read while a change of its
            // directory is in flight is never used (see `Listings::apply`).
            return Err(req.changed_names().into_iter().map(|(dir, _)| dir).find(|dir| self.list_now(*dir)));
        };
        if ino != 0 {
            let range = s.inos.front_mut().expect("an inode number was taken from it");
            range.start += 1;
            if range.is_empty() {
                s.inos.pop_front();
            }
        }
        debug_assert_eq!(s.numbered.0, epoch, "changes are numbered under the current epoch");
        s.numbered.1 += 1;
        let n = s.numbered.1;
        s.queue.push_back((epoch, n, DeferredChange { at, ino, req: req.clone() }));
        s.queued += 1;
        let queued = s.queued;
        for concerned in concerned(req, &resp) {
            s.touched.insert(concerned, queued);
        }
        if !s.sending {
            s.sending = true;
            tokio::spawn(async move { me.send_deferred().await });
        }
        self.stats.count("deferred", req.into());
        Ok(resp)
    }

    /// Whether files open or written here are past the bounds within which creates are
    /// answered here (`MAX_WRITTEN_FILES`, `MAX_OPEN_FILES`).
    fn too_many_files(&self) -> bool {
        let open = self.files.len();
        open >= MAX_OPEN_FILES
            || (open >= MAX_WRITTEN_FILES
                && self.files.iter().filter(|f| f.has_buffered()).nth(MAX_WRITTEN_FILES - 1).is_some())
    }

    /// Waits until every change queued so far was answered by the server.
    pub(crate) async fn drain_deferred(&self) {
        let target = self.deferred.lock().queued;
        self.wait_answered(target).await;
    }

    /// Waits until the changes queued so far that concern what `req` reads or changes were
    /// answered by the server; all of them for a namespace change (an rmdir depends on the
    /// unlinks inside the directory, which name only it) and for a request that names no
    /// inode (`Sync`, `StatFs`, locks…). A commit then waits for its file's create, not for
    /// every change queued behind it.
    pub(crate) async fn drain_for(&self, req: &MetaRequest) {
        let mut inos = req.read_inodes();
        inos.extend(req.changed_inodes());
        let all = inos.is_empty() || !req.changed_names().is_empty();
        let target = {
            let s = self.deferred.lock();
            match all {
                true => s.queued,
                false => inos.iter().filter_map(|i| s.touched.get(i).copied()).max().unwrap_or(0),
            }
        };
        self.wait_answered(target).await;
    }

    /// Waits until `target` changes were answered.
    async fn wait_answered(&self, target: u64) {
        loop {
            let answered = self.deferred.answered.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            if self.deferred.lock().finished >= target {
                return;
            }
            self.deferred.waited.notify_one();
            answered.await;
        }
    }

    /// Gives the solo lease back (recalled by the server): defers nothing more, and answers
    /// once the queue was sent.
    pub(crate) async fn recall_solo(&self, epoch: u64) {
        self.stats.count("callback", "RecallSolo");
        {
            let mut s = self.deferred.lock();
            s.ended += 1;
            if s.epoch == Some(epoch) {
                s.epoch = None;
            }
        }
        self.drain_deferred().await;
    }

    /// The connection to the metadata server was lost: the lease went with it (the server
    /// keeps it only for the queued changes, sent on the next connection before anything).
    pub(crate) fn solo_lost(&self) {
        let mut s = self.deferred.lock();
        s.ended += 1;
        s.epoch = None;
    }

    async fn ask_solo(&self, ended: u64) {
        if let Ok(MetaResponse::Solo(Some(epoch))) = self.call(MetaRequest::Solo).await {
            self.deferred.lock().granted(epoch, ended);
        }
    }

    async fn reserve_inodes(&self) {
        let got = self.call(MetaRequest::ReserveInodes { count: RESERVE }).await;
        let mut s = self.deferred.lock();
        s.reserving = false;
        match got {
            Ok(MetaResponse::Inodes { first }) => s.inos.push_back(first..first + Ino::from(RESERVE)),
            other => tracing::debug!("no inode numbers reserved: {other:?}"),
        }
    }

    /// Sends the queue, a batch at a time, until it is empty.
    async fn send_deferred(self: Arc<Self>) {
        let mut gathered = false;
        loop {
            let gather = !gathered && {
                let s = self.deferred.lock();
                s.queue.iter().all(|(_, _, c)| matches!(c.req, MetaRequest::Open { .. } | MetaRequest::Close { .. }))
            };
            if gather {
                let _ = tokio::time::timeout(GATHER, self.deferred.waited.notified()).await;
            }
            gathered = gather;
            let (epoch, first, changes) = {
                let mut s = self.deferred.lock();
                let Some(&(epoch, first, _)) = s.queue.front() else {
                    s.sending = false;
                    return;
                };
                let mut changes = Vec::new();
                while changes.len() < BATCH
                    && let Some((e, _, _)) = s.queue.front()
                    && *e == epoch
                {
                    changes.push(s.queue.pop_front().expect("checked").2);
                }
                (epoch, first, changes)
            };
            let count = changes.len() as u64;
            let req = MetaRequest::Deferred { epoch, first, changes };
            match self.send_batch(&req).await {
                Ok(failed) if failed.is_empty() => {}
                Ok(failed) => {
                    for (n, e) in &failed {
                        tracing::error!(n, "a namespace change answered here was refused by the metadata server: {e}");
                    }
                    self.stats.add("deferred", "failed", failed.len() as u64);
                    self.forget_all();
                }
                Err(e) => {
                    tracing::error!(count, "namespace changes answered here were lost: {e}");
                    self.stats.add("deferred", "failed", count);
                    self.forget_all();
                }
            }
            {
                let mut s = self.deferred.lock();
                s.finished += count;
                let finished = s.finished;
                s.touched.retain(|_, last| *last > finished);
            }
            self.deferred.answered.notify_waiters();
        }
    }

    /// Sends one batch, again over new connections while the server cannot be reached (the
    /// server applies each change once).
    async fn send_batch(&self, req: &MetaRequest) -> crate::Result<Vec<(u64, WireError)>> {
        let started = Instant::now();
        loop {
            match self.send_meta(req).await {
                Ok(MetaResponse::Applied(failed)) => return Ok(failed),
                Ok(other) => return Err(crate::unexpected(other)),
                Err(e) if e.unanswered() && started.elapsed() < RESEND_FOR => {
                    tracing::warn!("sending deferred namespace changes again: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A live directory's attributes as this client last left them.
    fn known_dir(&self, ino: Ino) -> Option<Attr> {
        self.dir_attrs.get(&ino).filter(|a| a.kind == FileKind::Dir && a.nlink > 0)
    }

    /// The answer the server would give to a create or mkdir making inode `ino` at `at`.
    fn local_make(&self, req: &MetaRequest, ino: Ino, at: Timestamp) -> Option<MetaResponse> {
        let MetaRequest::MakeNode { parent, name, kind, perm, rdev, target: None, caller, umask, open: _ } = req else {
            return None;
        };
        let p = self.known_dir(*parent)?;
        // A default ACL (the parent has xattrs) decides the mode on the server.
        let simple = matches!(kind, FileKind::File | FileKind::Dir) && !p.has_xattrs;
        if !simple
            || p.flags & inode_flags::IMMUTABLE != 0
            || !valid_name(name)
            || self.known_entry(*parent, name)?.is_some()
        {
            return None;
        }
        let mut perm = perm & !umask & 0o7777;
        let mut gid = caller.gid;
        if p.perm & S_ISGID != 0 {
            gid = p.gid;
            if *kind == FileKind::Dir {
                perm |= S_ISGID;
            }
        }
        let dir = *kind == FileKind::Dir;
        let attr = Attr {
            ino,
            kind: *kind,
            perm,
            nlink: if dir { 2 } else { 1 },
            uid: caller.uid,
            gid,
            rdev: *rdev,
            size: 0,
            atime: at,
            mtime: at,
            ctime: at,
            crtime: at,
            has_xattrs: false,
            stored: 0,
            flags: 0,
        };
        Some(MetaResponse::Changed { attr: Some(attr), dirs: vec![touched(p, i64::from(dir), at)], unnamed: vec![] })
    }

    /// The answer the server would give to an open of `ino`: what a directory page told of
    /// the file, if nothing changed it since (this client's own writes not committed yet are
    /// overlaid by every answer, as on the server's). The registration that keeps an unlinked
    /// file alive while open is queued like a change, so it reaches the server before any
    /// unlink of the file and before any other client's request.
    fn local_open(&self, ino: Ino) -> Option<MetaResponse> {
        let hint = self.open_hints.get(&ino)?;
        if hint.attr.nlink == 0 || self.listings.changed_since(ino, hint.epoch) {
            return None;
        }
        Some(MetaResponse::Opened { attr: hint.attr, first_map: hint.map.map(|m| m.to_vec()) })
    }

    /// The answer the server would give to a chmod, chown or utimes of a directory made at
    /// `at` (`tar x` sets every directory's at the end, `cp -a` and `rsync -a` too): one
    /// whose attributes this client knows for certain, with no flags and no xattrs (a chmod
    /// rewrites the access ACL on the server).
    fn local_setattr(&self, ino: Ino, set: &SetAttrs, at: Timestamp) -> Option<MetaResponse> {
        let mut a = self.known_dir(ino)?;
        if set.size.is_some() || set.flags.is_some() || a.flags != 0 || a.has_xattrs {
            return None;
        }
        a.perm = set.perm.map_or(a.perm, |p| p & 0o7777);
        a.uid = set.uid.unwrap_or(a.uid);
        a.gid = set.gid.unwrap_or(a.gid);
        a.atime = set.atime.map_or(a.atime, |t| t.resolve(at));
        a.mtime = set.mtime.map_or(a.mtime, |t| t.resolve(at));
        a.ctime = set.ctime.unwrap_or(at);
        Some(MetaResponse::Attr(a))
    }

    /// The answer the server would give to an unlink, rmdir or rename made at `at`.
    fn local_change(&self, req: &MetaRequest, at: Timestamp) -> Option<MetaResponse> {
        let locked = |a: &Attr| a.flags & inode_flags::LOCKED != 0;
        let links = |a: &Attr| i64::from(a.kind == FileKind::Dir);
        match req {
            MetaRequest::Unlink { parent, name } | MetaRequest::Rmdir { parent, name } => {
                let p = self.known_dir(*parent)?;
                let child = self.known_entry(*parent, name)??;
                let rmdir = matches!(req, MetaRequest::Rmdir { .. });
                if locked(&p) || locked(&child) || (child.kind == FileKind::Dir) != rmdir {
                    return None;
                }
                // Only a directory this client knows to be empty.
                if rmdir && !self.known_empty(child.ino) {
                    return None;
                }
                let dirs = vec![touched(p, -links(&child), at)];
                Some(MetaResponse::Changed { attr: None, dirs, unnamed: vec![child.ino] })
            }
            MetaRequest::Rename {
                parent,
                name,
                new_parent,
                new_name,
                mode: RenameMode::Replace | RenameMode::NoReplace,
            } => {
                let p = self.known_dir(*parent)?;
                let src = self.known_entry(*parent, name)??;
                // A directory moving elsewhere needs the server's check that it does not move
                // into itself; a rename over an existing name, the server's replace.
                let moves_dir = src.kind == FileKind::Dir && parent != new_parent;
                if locked(&p) || locked(&src) || moves_dir || !valid_name(new_name) {
                    return None;
                }
                if self.known_entry(*new_parent, new_name)?.is_some() {
                    return None;
                }
                let dirs = if parent == new_parent {
                    vec![touched(p, 0, at)]
                } else {
                    let q = self.known_dir(*new_parent)?;
                    if q.flags & inode_flags::IMMUTABLE != 0 {
                        return None;
                    }
                    vec![touched(p, -links(&src), at), touched(q, links(&src), at)]
                };
                let moved = Attr { ctime: at, ..src };
                Some(MetaResponse::Changed { unnamed: vec![moved.ino], attr: Some(moved), dirs })
            }
            _ => None,
        }
    }
}

/// The inodes a queued change concerns: what its answer describes or unnamed, and an opened
/// or closed file.
fn concerned(req: &MetaRequest, resp: &MetaResponse) -> Vec<Ino> {
    match (req, resp) {
        (_, MetaResponse::Changed { attr, dirs, unnamed }) => {
            attr.iter().chain(dirs).map(|a| a.ino).chain(unnamed.iter().copied()).collect()
        }
        (MetaRequest::Open { ino } | MetaRequest::Close { ino } | MetaRequest::SetAttr { ino, .. }, _) => vec![*ino],
        _ => Vec::new(),
    }
}

/// The set-group-ID bit: a directory with it gives new entries its group, and new
/// directories the bit.
const S_ISGID: u32 = 0o2000;

/// A directory's attributes after a change in it at `at` that adds `nlink_delta` links.
fn touched(mut dir: Attr, nlink_delta: i64, at: Timestamp) -> Attr {
    dir.nlink = (i64::from(dir.nlink) + nlink_delta) as u32;
    dir.mtime = at;
    dir.ctime = at;
    dir
}

/// A name the server accepts (else it is sent, for the server's error).
fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name != b"."
        && name != b".."
        && !name.contains(&b'/')
        && !name.contains(&0)
        && name.len() <= NAME_MAX
}

#[cfg(test)]
mod tests {
    use super::State;

    #[test]
    fn changes_are_numbered_on_under_an_epoch_granted_again() {
        let mut s = State::default();
        s.granted(7, 0);
        s.numbered.1 += 3;
        // A second ask answered with the same epoch ("held already").
        s.granted(7, 0);
        assert_eq!(s.numbered, (7, 3));
        // The lease ended here (connection lost) and the server still held it for us.
        s.ended += 1;
        s.epoch = None;
        s.granted(7, 0);
        assert_eq!(s.epoch, None, "an answer to an ask from before the end is not used");
        s.granted(7, 1);
        assert_eq!((s.epoch, s.numbered), (Some(7), (7, 3)));
        s.granted(8, 1);
        assert_eq!(s.numbered, (8, 0), "a new epoch numbers from 1");
    }
}
