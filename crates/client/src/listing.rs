//! Whole-directory listings, so that a run of lookups in one directory (`stat` of every file,
//! `git status`, a build reading headers) costs one round trip instead of one per name, and a
//! name missing from a listing is answered as a negative entry locally.
//!
//! A listing is fetched after a few lookups in a small directory and trusted for the map TTL,
//! the same bound that holds for the kernel's own entry cache (answers from it carry only the
//! rest of that time as their TTL, so nothing the kernel holds is older than one TTL). A
//! directory this client just made is listed as empty without asking (see `made_dir`). The
//! read lease on the directory makes another client's change recall the listing; changes by
//! this client show at once:
//!
//! * every request that may change an inode's attributes marks the inode with a fresh epoch
//!   when sent and again when answered, and a listed entry is used only if it was read after
//!   the inode's last mark;
//! * this client's namespace changes are applied to the listing of the directory they change
//!   (a created name is added, a removed one dropped, a renamed one marked unknown), and a
//!   listing the change could not be applied to (it was being fetched) is not used again.

use crate::Client;
use cairn_proto::meta::{MetaRequest, MetaResponse, RenameMode};
use cairn_proto::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Directories with more entries than this are not listed whole.
const MAX_ENTRIES: usize = 16_384;
/// Entries per directory page asked for while listing (the server's largest page).
const PAGE: u32 = 4096;
/// Lookups in one directory within the TTL after which it is listed whole.
const LOOKUPS_BEFORE_LISTING: u32 = 3;
/// Listed entries kept in memory, over all directories.
const MAX_CACHED_ENTRIES: u64 = 200_000;

/// What a listing knows about one name.
enum Slot {
    /// The entry's attributes, read at `epoch`.
    Known(Attr, u64),
    /// Changed by this client in a way the answer did not describe: ask the server.
    Unknown,
}

/// One directory's entries.
pub(crate) struct Listing {
    at: Instant,
    /// Every change of the directory's entries by this client up to this epoch is applied.
    covered: AtomicU64,
    /// An epoch taken once the listing was in the cache (`u64::MAX` before): a request sent
    /// after it found the listing there, and marked the names it changes unknown in it.
    born: AtomicU64,
    /// `None`: the directory is too large to be listed whole.
    entries: Option<Mutex<HashMap<Vec<u8>, Slot>>>,
}

impl Listing {
    /// A listing read from (or, for a new directory, known to be) the server's state after
    /// every change of this client up to `covered`.
    fn new(covered: u64, entries: Option<HashMap<Vec<u8>, Slot>>) -> Listing {
        Listing {
            at: Instant::now(),
            covered: AtomicU64::new(covered),
            born: AtomicU64::new(u64::MAX),
            entries: entries.map(Mutex::new),
        }
    }
}

/// An answer to a lookup from a listing: the attributes (`None`: no such name) and how long
/// the kernel may keep it.
pub struct Entry {
    pub attr: Option<Attr>,
    pub ttl: Duration,
}

/// What a listing knows about a name.
enum Listed {
    /// The answer.
    Entry(Entry),
    /// The name holds inode `ino`, whose attributes changed since they were listed (a write,
    /// a chmod): the listing answers only with attributes this client got later.
    Changed(Ino, Duration),
}

pub(crate) struct Listings {
    pub(crate) ttl: Duration,
    epoch: AtomicU64,
    /// Answers to requests sent before this epoch are not current (see `changed_everywhere`).
    floor: AtomicU64,
    /// Epoch of the last known change of each inode's attributes or entries (by this client,
    /// or by another, learnt from a recall).
    changed: moka::sync::Cache<Ino, u64>,
    lookups: moka::sync::Cache<Ino, u32>,
    listings: moka::sync::Cache<Ino, Arc<Listing>>,
    /// Directories whose listing is being fetched (one fetch per directory at a time).
    fetching: dashmap::DashSet<Ino>,
    /// Woken whenever a fetch of a listing ends.
    fetched: tokio::sync::Notify,
}

impl Listings {
    pub(crate) fn new(ttl: Duration) -> Listings {
        Listings {
            ttl,
            epoch: AtomicU64::new(1),
            floor: AtomicU64::new(0),
            // Marks outlive every listing that could predate them.
            changed: moka::sync::Cache::builder().max_capacity(1_000_000).time_to_live(ttl * 2).build(),
            lookups: moka::sync::Cache::builder().max_capacity(10_000).time_to_live(ttl).build(),
            fetching: dashmap::DashSet::new(),
            fetched: tokio::sync::Notify::new(),
            listings: moka::sync::Cache::builder()
                .max_capacity(MAX_CACHED_ENTRIES)
                .weigher(|_, l: &Arc<Listing>| {
                    l.entries.as_ref().map_or(1, |e| e.lock().expect("listing").len() as u32 + 1)
                })
                .time_to_live(ttl)
                .build(),
        }
    }

    /// A fresh epoch, later than every one handed out before.
    pub(crate) fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn mark(&self, ino: Ino, epoch: u64) {
        self.changed.entry(ino).and_upsert_with(|old| old.map_or(epoch, |o| o.into_value().max(epoch)));
    }

    /// Another client changed `ino`: listings of it, entries naming it, and answers about it
    /// to requests sent before now are no longer current.
    pub(crate) fn changed_elsewhere(&self, ino: Ino) {
        let epoch = self.next_epoch();
        self.mark(ino, epoch);
    }

    /// Nothing cached is current any more, nor any answer to a request sent before now (the
    /// connection to the server was lost); returns the epoch from which answers count again.
    pub(crate) fn changed_everywhere(&self) -> u64 {
        let epoch = self.next_epoch();
        self.floor.fetch_max(epoch, Ordering::AcqRel);
        self.listings.invalidate_all();
        epoch
    }

    /// Whether `ino` changed after `epoch`: through this client, through another (a recall),
    /// or possibly (the connection was lost since).
    pub(crate) fn changed_since(&self, ino: Ino, epoch: u64) -> bool {
        self.floor.load(Ordering::Acquire) > epoch || self.changed.get(&ino).is_some_and(|c| c > epoch)
    }

    /// The listing of `dir`, if it is present and still describes this client's view.
    fn usable(&self, dir: Ino) -> Option<Arc<Listing>> {
        let l = self.listings.get(&dir)?;
        let covered = l.covered.load(Ordering::Acquire);
        // A directory found too large stays so for the TTL, whatever changes in it.
        let current = l.entries.is_none()
            || (self.floor.load(Ordering::Acquire) <= covered && self.changed.get(&dir).is_none_or(|c| c <= covered));
        (l.at.elapsed() < self.ttl && current).then_some(l)
    }

    /// What the listing of `parent` tells about `name`, if it tells anything.
    fn answer(&self, parent: Ino, name: &[u8]) -> Option<Listed> {
        let l = self.usable(parent)?;
        let ttl = self.ttl.checked_sub(l.at.elapsed())?;
        let entries = l.entries.as_ref()?.lock().expect("listing");
        match entries.get(name) {
            None => Some(Listed::Entry(Entry { attr: None, ttl })),
            Some(slot) => self.read_slot(slot, ttl),
        }
    }

    /// What a listed name's slot tells, if anything.
    fn read_slot(&self, slot: &Slot, ttl: Duration) -> Option<Listed> {
        match slot {
            Slot::Unknown => None,
            Slot::Known(a, epoch) if self.changed_since(a.ino, *epoch) => Some(Listed::Changed(a.ino, ttl)),
            Slot::Known(a, _) => Some(Listed::Entry(Entry { attr: Some(a.clone()), ttl })),
        }
    }

    /// Every entry of `dir`'s listing with what its slot tells, if it tells something of each.
    fn all(&self, dir: Ino) -> Option<Vec<(Vec<u8>, Listed)>> {
        let l = self.usable(dir)?;
        let ttl = self.ttl.checked_sub(l.at.elapsed())?;
        let entries = l.entries.as_ref()?.lock().expect("listing");
        entries.iter().map(|(name, slot)| Some((name.clone(), self.read_slot(slot, ttl)?))).collect()
    }

    /// Applies `f` to the entries of `dir`'s listing, if it has one; returns that listing.
    fn edit(&self, dir: Ino, f: impl FnOnce(&mut HashMap<Vec<u8>, Slot>)) -> Option<Arc<Listing>> {
        let l = self.listings.get(&dir)?;
        f(&mut l.entries.as_ref()?.lock().expect("listing"));
        Some(l)
    }

    /// Like `edit`, and records that the listing includes this client's change of `dir`, sent
    /// at `sent` and answered at `epoch` (the directory itself is marked changed, which alone
    /// retires a listing).
    fn apply(&self, dir: Ino, sent: u64, epoch: u64, f: impl FnOnce(&mut HashMap<Vec<u8>, Slot>)) {
        // Only a listing that covered every earlier change keeps covering them, and only one
        // the request found when it was sent: one fetched meanwhile (for a lookup, see
        // `list_now`) may have been read before or after the change.
        if let Some(l) = self.edit(dir, f)
            && l.born.load(Ordering::Acquire) < sent
            && self.changed.get(&dir).is_none_or(|c| c <= l.covered.load(Ordering::Acquire))
        {
            l.covered.fetch_max(epoch, Ordering::AcqRel);
        }
        self.mark(dir, epoch);
    }

    /// Lists a directory this client just made, sent at `sent`, as empty: the names looked up
    /// in it next (untar, `git clone`, `cp -a` create every file after a failed lookup) are
    /// answered locally. The server granted this client a read lease on the new directory
    /// before any other request could run (see `cairn-meta`'s `leases`), so whatever another
    /// client adds to it is recalled, which marks it after `sent` and retires this listing;
    /// a recall that overtook this answer has marked it already.
    fn made_dir(&self, dir: Ino, sent: u64) {
        self.insert(dir, Listing::new(sent, Some(HashMap::new())));
    }

    /// Caches `listing` as `dir`'s.
    fn insert(&self, dir: Ino, listing: Listing) {
        let listing = Arc::new(listing);
        self.listings.insert(dir, listing.clone());
        listing.born.store(self.next_epoch(), Ordering::Release);
    }

    /// Marks what `req` may change before it is sent; returns the epoch it was sent at.
    pub(crate) fn before(&self, req: &MetaRequest) -> u64 {
        let epoch = self.next_epoch();
        for ino in crate::cached_changes(req) {
            self.mark(ino, epoch);
        }
        // A name's state is unknown until the answer says what became of it. Its inode
        // changes too (nlink, ctime), but appears in no other listing: see `slot`.
        for (dir, name) in req.changed_names() {
            self.edit(dir, |e| {
                e.insert(name.to_vec(), Slot::Unknown);
            });
        }
        epoch
    }

    /// Records what an answered `req` changed (see [`Listings::before`]); returns the epoch
    /// it marked the inodes it changed with.
    pub(crate) fn after(&self, req: &MetaRequest, sent: u64, resp: &Result<MetaResponse, crate::ClientError>) -> u64 {
        use MetaRequest as R;
        // First the marks: whatever the answer, an inode the request may have changed may
        // have changed after any listing read meanwhile.
        let epoch = self.next_epoch();
        for ino in crate::cached_changes(req) {
            self.mark(ino, epoch);
        }
        if let Ok(MetaResponse::Changed { unnamed, .. }) = resp {
            unnamed.iter().for_each(|ino| self.mark(*ino, epoch));
        }
        // A change that failed for want of an answer may still have happened: retire the
        // listings. (An error from the server itself means nothing changed.)
        if let Err(e) = resp
            && e.unanswered()
        {
            req.changed_names().into_iter().for_each(|(dir, _)| self.mark(dir, epoch));
        }
        // Then what the answer tells about names; entries it adds are read now.
        let fresh = || self.next_epoch();
        match (req, resp) {
            // A lookup answer describes the name as of when it was sent: it is no news if this
            // client changed the directory since.
            (R::Lookup { parent, .. }, _) if self.changed_since(*parent, sent) => {}
            (R::Lookup { parent, name }, Ok(MetaResponse::Attr(a))) => {
                self.edit(*parent, |e| {
                    if !matches!(e.get(name.as_slice()), Some(Slot::Known(_, at)) if *at > sent) {
                        e.insert(name.clone(), slot(a, sent));
                    }
                });
            }
            (R::Lookup { parent, name }, Err(err)) if err.code == ErrorCode::NotFound => {
                self.edit(*parent, |e| {
                    if matches!(e.get(name.as_slice()), Some(Slot::Known(_, at)) if *at < sent) {
                        e.remove(name.as_slice());
                    }
                });
            }
            (R::MakeNode { parent, name, .. }, Ok(MetaResponse::Changed { attr: Some(a), .. })) => {
                self.apply(*parent, sent, epoch, |e| {
                    e.insert(name.clone(), slot(a, fresh()));
                });
                if a.kind == FileKind::Dir {
                    self.made_dir(a.ino, sent);
                }
            }
            (R::Link { new_parent, new_name, .. }, Ok(MetaResponse::Changed { attr: Some(a), .. })) => {
                self.apply(*new_parent, sent, epoch, |e| {
                    e.insert(new_name.clone(), slot(a, fresh()));
                })
            }
            (R::Unlink { parent, name } | R::Rmdir { parent, name }, Ok(_)) => self.apply(*parent, sent, epoch, |e| {
                e.remove(name.as_slice());
            }),
            (R::Rename { parent, name, new_parent, new_name, mode }, Ok(resp)) => {
                // The source name is gone, unless it was swapped or left a whiteout; the
                // target (marked unknown before) now names the moved inode, whose attributes
                // only a rename answered by this client itself tells (see `deferred`).
                let gone = matches!(mode, RenameMode::Replace | RenameMode::NoReplace);
                self.apply(*parent, sent, epoch, |e| {
                    if gone {
                        e.remove(name.as_slice());
                    }
                });
                let moved = match resp {
                    MetaResponse::Changed { attr: Some(a), .. } if gone => Some(a),
                    _ => None,
                };
                self.apply(*new_parent, sent, epoch, |e| {
                    if let Some(a) = moved {
                        e.insert(new_name.clone(), slot(a, fresh()));
                    }
                });
            }
            _ => {}
        }
        // Last, as `apply` needs the directories' marks from before this change.
        if let Ok(MetaResponse::Changed { dirs, .. }) = resp {
            dirs.iter().for_each(|d| self.mark(d.ino, epoch));
        }
        epoch
    }
}

/// How a listing holds an entry read at `epoch`. An inode with several links is never
/// answered from a listing: a change through another of its names (an unlink, a rename
/// over it) would have to find every listing that holds it.
fn slot(a: &Attr, epoch: u64) -> Slot {
    match a.kind == FileKind::Dir || a.nlink <= 1 {
        true => Slot::Known(a.clone(), epoch),
        false => Slot::Unknown,
    }
}

impl Client {
    /// Answers a lookup from the listing of `parent`, fetching the listing first when the
    /// directory has seen enough lookups lately; `None`: ask the server.
    pub async fn listed(&self, parent: Ino, name: &[u8]) -> Option<Entry> {
        let l = &self.listings;
        if let Some(hit) = l.answer(parent, name) {
            return self.complete(hit);
        }
        if !self.list_now(parent) {
            return None;
        }
        self.list(parent).await;
        self.complete(l.answer(parent, name)?)
    }

    /// Counts a name looked up or changed in `dir`; true if `dir` is to be listed now
    /// (enough names lately, no current listing, and no fetch of one under way): the fetch is
    /// then claimed, and the caller must [`Client::list`] it.
    pub(crate) fn list_now(&self, dir: Ino) -> bool {
        let l = &self.listings;
        let seen = l.lookups.entry(dir).and_upsert_with(|n| n.map_or(1, |n| n.into_value() + 1)).into_value();
        seen >= LOOKUPS_BEFORE_LISTING && self.claim_listing(dir)
    }

    /// Claims the fetch of `dir`'s listing unless a current one is cached or being fetched;
    /// true if claimed, and the caller must then [`Client::list`] it.
    pub(crate) fn claim_listing(&self, dir: Ino) -> bool {
        let l = &self.listings;
        l.usable(dir).is_none() && l.fetching.insert(dir)
    }

    /// Fetches the listing of `dir` (claimed by [`Client::list_now`]).
    pub(crate) async fn list(&self, dir: Ino) {
        let l = &self.listings;
        let fetched = self.fetch_listing(dir).await;
        // A listing retired early is fetched again only after as many lookups again.
        l.lookups.invalidate(&dir);
        if let Ok(listing) = fetched {
            l.insert(dir, listing);
        }
        l.fetching.remove(&dir);
        l.fetched.notify_waiters();
    }

    /// Waits for the fetch of `dir`'s listing under way, if any (see `walk`): the kernel
    /// then lists it from that instead of asking the server again.
    async fn fetched(&self, dir: Ino) {
        let l = &self.listings;
        loop {
            let wake = l.fetched.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if !l.fetching.contains(&dir) {
                return;
            }
            wake.await;
        }
    }

    /// What the listing of `dir` says of `name` for certain: `Some(None)` missing,
    /// `Some(Some(attr))` present, `None` not known.
    pub(crate) fn known_entry(&self, dir: Ino, name: &[u8]) -> Option<Option<Attr>> {
        Some(self.complete(self.listings.answer(dir, name)?)?.attr)
    }

    /// Whether the listing of `dir` says for certain that it is empty.
    pub(crate) fn known_empty(&self, dir: Ino) -> bool {
        self.listings.all(dir).is_some_and(|e| e.is_empty())
    }

    /// The lookup answer from what a listing knows: with the attributes this client got
    /// since for an inode that changed (the answer to its commit or chmod, which the files'
    /// and directories' attribute caches keep until a recall), and this client's own
    /// buffered writes and atime updates shown.
    fn complete(&self, listed: Listed) -> Option<Entry> {
        let mut hit = match listed {
            Listed::Entry(hit) => hit,
            Listed::Changed(ino, ttl) => match (self.file_attrs.get(ino), self.dir_attrs.get(&ino)) {
                (Some((a, left)), _) => Entry { attr: Some(a), ttl: ttl.min(left) },
                (None, Some(a)) => Entry { attr: Some(a), ttl },
                (None, None) => return None,
            },
        };
        hit.attr = hit.attr.map(|a| self.note_attr(a));
        Some(hit)
    }

    /// The entries of `dir` with their attributes from its listing, when it can answer for
    /// every name, and how long the kernel may keep them (the rest of the listing's TTL);
    /// `None`: ask the server. Cookies are positions in the returned list, which only a
    /// reader of this list may continue from.
    pub async fn listed_entries(self: &Arc<Self>, dir: Ino) -> Option<(Vec<DirEntry>, Duration)> {
        self.fetched(dir).await;
        let mut ttl = self.listings.ttl;
        let mut entries = Vec::new();
        for (cookie, (name, listed)) in (1..).zip(self.listings.all(dir)?) {
            let Entry { attr, ttl: left } = self.complete(listed)?;
            let a = attr?;
            ttl = ttl.min(left);
            entries.push(DirEntry { name, ino: a.ino, kind: a.kind, cookie, attr: Some(a), first_map: None });
        }
        self.accessed(dir, true);
        self.reorder_open_hints(dir, &entries);
        self.walked(dir, &entries);
        Some((entries, ttl))
    }

    /// An epoch to check answers kept for later against (see [`Client::unchanged_since`]).
    pub fn epoch(&self) -> u64 {
        self.listings.next_epoch()
    }

    /// Whether neither directory `dir` nor any of `inos` changed after `epoch`, through this
    /// client or another (a recall), so that an answer about them read since is still current.
    pub fn unchanged_since(&self, mut inos: impl Iterator<Item = Ino>, dir: Ino, epoch: u64) -> bool {
        let l = &self.listings;
        !l.changed_since(dir, epoch) && !inos.any(|ino| l.changed_since(ino, epoch))
    }

    async fn fetch_listing(&self, dir: Ino) -> crate::Result<Listing> {
        let epoch = self.listings.next_epoch();
        let at = Instant::now();
        let mut entries = HashMap::new();
        let mut after = 0;
        // The server lists what this client's deferred changes left (see `deferred`).
        self.drain_for(&MetaRequest::ReadDir { ino: dir, after: 0, limit: PAGE, plus: true }).await;
        let complete = loop {
            let req = MetaRequest::ReadDir { ino: dir, after, limit: PAGE, plus: true };
            self.stats.count("meta", (&req).into());
            let page = match self.meta.call::<_, MetaResponse>(&req).await?.0 {
                MetaResponse::Dir(mut page) => {
                    self.note_open_hints(dir, &mut page, epoch);
                    page
                }
                other => return Err(crate::unexpected(other)),
            };
            let end = page.len() < PAGE as usize;
            after = page.last().map_or(after, |e| e.cookie);
            for a in page.iter().filter_map(|e| e.attr.as_ref()) {
                self.keep_listed_dir(a, epoch);
            }
            entries.extend(page.into_iter().filter_map(|e| Some((e.name, slot(&e.attr?, epoch)))));
            if end || entries.len() > MAX_ENTRIES {
                break end && entries.len() <= MAX_ENTRIES;
            }
        };
        Ok(Listing { at, ..Listing::new(epoch, complete.then_some(entries)) })
    }

    /// Keeps a subdirectory's attributes from a listing read at `epoch` as a lookup's answer
    /// would be: its own listing starts with them (`.`), and `tar c` or `find` list it next.
    pub(crate) fn keep_listed_dir(&self, a: &Attr, epoch: u64) {
        if a.kind == FileKind::Dir && !self.listings.changed_since(a.ino, epoch) {
            self.keep_dir_attr(a.clone());
        }
    }

    /// Keeps a first page of `dir`'s entries with their attributes that held all of them
    /// (asked for at `epoch`) as its listing, unless a current one is cached: `rm -r`, `tar c`
    /// and `find` list a directory before working in it, and its names are then answered and
    /// changed here (see `deferred`) with no listing fetched twice.
    pub(crate) fn listed_whole(&self, dir: Ino, epoch: u64, page: &[DirEntry]) {
        if page.len() > MAX_ENTRIES || self.listings.usable(dir).is_some() {
            return;
        }
        let entries = page.iter().map(|e| Some((e.name.clone(), slot(e.attr.as_ref()?, epoch)))).collect();
        if let Some(entries) = entries {
            self.listings.insert(dir, Listing::new(epoch, Some(entries)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientError;
    use cairn_proto::meta::SetAttrs;

    fn attr(ino: Ino, kind: FileKind, nlink: u32) -> Attr {
        crate::test_attr(ino, kind, nlink)
    }

    const DIR: Ino = 1;

    /// A cache holding a listing of `DIR` with files "a" (ino 10), "b" (11) and "c" (12,
    /// two links).
    fn listed() -> Listings {
        let l = Listings::new(Duration::from_secs(60));
        let epoch = l.next_epoch();
        let entries = [("a", 10, 1), ("b", 11, 1), ("c", 12, 2)]
            .into_iter()
            .map(|(n, ino, links)| (n.as_bytes().to_vec(), slot(&attr(ino, FileKind::File, links), epoch)))
            .collect();
        l.insert(DIR, Listing::new(epoch, Some(entries)));
        l
    }

    /// What a lookup of `name` gets: Some(Some(ino)) found, Some(None) missing, None: ask.
    fn ask(l: &Listings, name: &str) -> Option<Option<Ino>> {
        match l.answer(DIR, name.as_bytes())? {
            Listed::Entry(e) => Some(e.attr.map(|a| a.ino)),
            Listed::Changed(..) => None,
        }
    }

    fn send(l: &Listings, req: MetaRequest, resp: Result<MetaResponse, ClientError>) {
        let sent = l.before(&req);
        l.after(&req, sent, &resp);
    }

    fn changed(attr: Option<Attr>) -> Result<MetaResponse, ClientError> {
        Ok(MetaResponse::Changed { attr, dirs: vec![attr_dir()], unnamed: Vec::new() })
    }

    fn attr_dir() -> Attr {
        attr(DIR, FileKind::Dir, 2)
    }

    #[test]
    fn answers_names_and_misses_but_not_multiply_linked_inodes() {
        let l = listed();
        assert_eq!(ask(&l, "a"), Some(Some(10)));
        assert_eq!(ask(&l, "zz"), Some(None));
        assert_eq!(ask(&l, "c"), None, "two links: ask the server");
        assert!(l.answer(2, b"a").is_none(), "no listing of that directory");
    }

    #[test]
    fn this_clients_changes_show_at_once() {
        let l = listed();
        let set = SetAttrs { perm: Some(0o600), ..Default::default() };
        send(
            &l,
            MetaRequest::SetAttr { ino: 10, set, caller: Default::default() },
            Ok(MetaResponse::Attr(attr(10, FileKind::File, 1))),
        );
        assert_eq!(ask(&l, "a"), None, "changed inode: ask the server");
        assert!(
            matches!(l.answer(DIR, b"a"), Some(Listed::Changed(10, _))),
            "changed inode: the name still holds it, for attributes got since"
        );
        send(
            &l,
            MetaRequest::Lookup { parent: DIR, name: b"a".to_vec() },
            Ok(MetaResponse::Attr(attr(10, FileKind::File, 1))),
        );
        assert_eq!(ask(&l, "a"), Some(Some(10)), "the server's answer is cached again");

        send(&l, MetaRequest::Unlink { parent: DIR, name: b"b".to_vec() }, changed(None));
        assert_eq!(ask(&l, "b"), Some(None), "unlinked");

        let new = attr(20, FileKind::File, 1);
        let make = MetaRequest::MakeNode {
            parent: DIR,
            name: b"new".to_vec(),
            kind: FileKind::File,
            perm: 0o644,
            rdev: 0,
            target: None,
            caller: Default::default(),
            umask: 0,
            open: false,
        };
        send(&l, make, changed(Some(new)));
        assert_eq!(ask(&l, "new"), Some(Some(20)), "created");

        let rename = |name: &str, to: &str, mode| MetaRequest::Rename {
            parent: DIR,
            name: name.as_bytes().to_vec(),
            new_parent: DIR,
            new_name: to.as_bytes().to_vec(),
            mode,
        };
        send(&l, rename("new", "moved", RenameMode::Replace), changed(None));
        assert_eq!(ask(&l, "new"), Some(None), "rename: source gone");
        assert_eq!(ask(&l, "moved"), None, "rename: target unknown");
        send(&l, rename("a", "zz", RenameMode::Exchange), Err(ClientError::new(ErrorCode::NotFound, "no")));
        assert!(l.usable(DIR).is_some(), "a refused change changed nothing");
        send(&l, rename("a", "zz", RenameMode::Exchange), Err(ClientError::new(ErrorCode::TimedOut, "lost")));
        assert!(l.usable(DIR).is_none(), "a change that may have happened retires the listing");
    }

    #[test]
    fn a_new_directory_is_empty_until_recalled_even_by_a_recall_that_overtook_the_answer() {
        let make = MetaRequest::MakeNode {
            parent: DIR,
            name: b"sub".to_vec(),
            kind: FileKind::Dir,
            perm: 0o755,
            rdev: 0,
            target: None,
            caller: Default::default(),
            umask: 0,
            open: false,
        };
        let l = listed();
        send(&l, make.clone(), changed(Some(attr(30, FileKind::Dir, 2))));
        assert!(matches!(l.answer(30, b"x"), Some(Listed::Entry(Entry { attr: None, .. }))), "empty");
        l.changed_elsewhere(30);
        assert!(l.answer(30, b"x").is_none(), "recalled: ask the server");

        let l = listed();
        let sent = l.before(&make);
        l.changed_elsewhere(31);
        l.after(&make, sent, &changed(Some(attr(31, FileKind::Dir, 2))));
        assert!(l.answer(31, b"x").is_none(), "a recall before the answer: ask the server");

        let l = listed();
        let sent = l.before(&make);
        l.changed_everywhere();
        l.after(&make, sent, &changed(Some(attr(32, FileKind::Dir, 2))));
        assert!(l.answer(32, b"x").is_none(), "the connection was lost meanwhile: ask the server");
    }

    #[test]
    fn a_listing_fetched_while_a_change_in_it_was_in_flight_is_not_used() {
        let l = Listings::new(Duration::from_secs(60));
        let rename = MetaRequest::Rename {
            parent: 2,
            name: b"x".to_vec(),
            new_parent: DIR,
            new_name: b"moved".to_vec(),
            mode: RenameMode::Replace,
        };
        let sent = l.before(&rename);
        // Read from the server before it applied the rename, cached before the answer came.
        l.insert(DIR, Listing::new(l.next_epoch(), Some(HashMap::new())));
        l.after(&rename, sent, &changed(None));
        assert_eq!(ask(&l, "moved"), None, "a listing that may predate the rename was used");
    }

    #[test]
    fn a_change_while_listing_is_fetched_retires_it() {
        let l = Listings::new(Duration::from_secs(60));
        let fetch_epoch = l.next_epoch();
        send(&l, MetaRequest::Unlink { parent: DIR, name: b"a".to_vec() }, changed(None));
        let entries = [(b"a".to_vec(), slot(&attr(10, FileKind::File, 1), fetch_epoch))].into_iter().collect();
        l.insert(DIR, Listing::new(fetch_epoch, Some(entries)));
        assert_eq!(ask(&l, "a"), None);
    }
}
