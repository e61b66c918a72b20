//! The filesystem core behind the mount: turns filesystem calls into requests to the metadata
//! server and chunk servers. It knows nothing about FUSE, so it can be driven and tested
//! without a kernel; `mount/` adapts it to `fuser`.

mod admin;
mod atime;
mod attrs;
mod blocks;
mod compact;
mod deferred;
mod disk_cache;
mod error;
pub mod layout;
mod listing;
mod locks;
mod namespace;
mod read;
mod recall;
mod session;
mod stats;
mod walk;
mod write;

pub use atime::AtimeMode;
pub use error::{ClientError, Result};
pub use listing::Entry;
pub use locks::{LockCall, open_lock_owner};
pub use read::Reading;
pub use recall::KernelInvalidator;

use cairn_net::{Identity, RpcClient};
use cairn_proto::meta::{MetaRequest, MetaResponse};
use cairn_proto::*;
use dashmap::DashMap;
use std::sync::Arc;
use std::time::Duration;

/// How a client connects and how much memory it may use.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Metadata server address, `host:port`.
    pub meta: String,
    pub volume: String,
    /// Deadline of every network call.
    pub timeout: Duration,
    /// Bytes of decoded blocks kept in memory.
    pub cache_bytes: u64,
    /// Bytes of written data that may be buffered or in flight before writers wait.
    pub write_buffer_bytes: u64,
    /// The on-disk block cache, if any: its directory and its bound in bytes.
    pub disk_cache: Option<(std::path::PathBuf, u64)>,
    /// How long cached attributes, names, listings, maps and sizes are kept. Another client's
    /// change recalls them sooner (read leases), so this bounds memory more than staleness;
    /// it must stay below the metadata server's lease (60 s).
    pub map_ttl: Duration,
    /// When reads update atime (`noatime`, `relatime`, `strictatime`; read-only mounts never).
    pub atime: AtimeMode,
    /// Whether listing a directory updates its atime (`nodiratime` turns it off).
    pub diratime: bool,
    /// Whether namespace changes may be answered here and sent afterwards while this client
    /// is the volume's only one (see `deferred`); `dirsync` and `sync` mounts turn it off.
    pub defer_namespace: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            meta: String::new(),
            volume: String::new(),
            timeout: Duration::from_secs(10),
            cache_bytes: 64 << 20,
            write_buffer_bytes: 64 << 20,
            disk_cache: None,
            map_ttl: Duration::from_secs(10),
            atime: AtimeMode::default(),
            diratime: true,
            defer_namespace: true,
        }
    }
}

/// A mounted volume's client state, shared by every FUSE worker thread.
pub struct Client {
    pub(crate) meta: RpcClient,
    pub(crate) volume: VolumeInfo,
    /// Compresses and encrypts the blocks this client writes; decodes what it reads.
    /// Replaced when a block names a key this client lacks (see `Client::refresh_codec`).
    pub(crate) codec: std::sync::RwLock<Arc<cairn_block::Codec>>,
    pub(crate) blocks: blocks::BlockClient,
    pub(crate) files: DashMap<Ino, Arc<write::FileState>>,
    /// Chunk maps keyed by (inode, data generation, chunk index).
    pub(crate) maps: moka::future::Cache<(Ino, u64, u64), Arc<Vec<SliceRef>>>,
    /// Bumped when a file's data changes through this client, retiring its cached maps.
    /// Entries live twice the map TTL: once one expires (reading as 0 again), every map
    /// cached under an older generation has expired too.
    pub(crate) generations: moka::sync::Cache<Ino, u64>,
    pub(crate) sizes: moka::sync::Cache<Ino, u64>,
    /// Inodes recently seen without any xattr: getxattr/listxattr answer them locally.
    pub(crate) no_xattrs: moka::sync::Cache<Ino, ()>,
    /// Xattr names recently found missing on an inode. The kernel asks for
    /// `security.capability` before every write (to drop file capabilities): without this,
    /// each small write cost a round trip once the inode's attributes were a second old.
    pub(crate) xattr_misses: moka::sync::Cache<(Ino, Vec<u8>), ()>,
    /// Inodes whose xattrs this client changed lately; an attribute fetched before the change
    /// must not mark them xattr-free again.
    pub(crate) xattrs_changed: moka::sync::Cache<Ino, ()>,
    pub(crate) write_budget: write::WriteBudget,
    /// Turns for closed files' write-behind (see `Client::release`).
    pub(crate) write_behind: Arc<tokio::sync::Semaphore>,
    /// Blocks stored without fsync, per file, until an fsync of that file syncs them. Kept
    /// apart from the open-file state so an fsync after close and reopen still covers them.
    pub(crate) unsynced: DashMap<Ino, Vec<(ServerId, cairn_proto::chunk::BlockKey)>>,
    /// End offset of the last read per inode, to detect sequential reads for readahead.
    pub(crate) last_read: moka::sync::Cache<Ino, u64>,
    pub(crate) atimes: atime::Atimes,
    /// Chunks being compacted by this client (one compaction per chunk at a time).
    pub(crate) compacting: dashmap::DashSet<(Ino, u64)>,
    /// `chattr` flags of inodes seen with any set, so writes through handles opened earlier
    /// fail on immutable files and reads skip atime on `noatime` ones.
    pub(crate) inode_flags: moka::sync::Cache<Ino, u32>,
    /// Directories' attributes as this client's last namespace change (or lookup, getattr)
    /// left them, for the getattr the kernel sends after every create, unlink or rename in a
    /// directory (it drops the parent's attributes then). Kept for the attribute TTL, like the
    /// kernel's own cache; a recall drops them.
    pub(crate) dir_attrs: moka::sync::Cache<Ino, Attr>,
    /// What directory listings told of empty and small files, for their opens (see
    /// `read::OpenHint`).
    pub(crate) open_hints: moka::sync::Cache<Ino, read::OpenHint>,
    /// Per directory, the last listing page files were opened from (weakly held, compared by
    /// address), the place in it of the last one and how far its files were fetched ahead
    /// (see `Client::read_ahead_files`).
    pub(crate) opens_in_dirs: moka::sync::Cache<Ino, (std::sync::Weak<Vec<Ino>>, usize, usize)>,
    /// Files' attributes for the getattr that follows every read (see `attrs`).
    pub(crate) file_attrs: attrs::FileAttrs,
    /// Whole directories, for runs of lookups (see `listing`).
    pub(crate) listings: listing::Listings,
    /// Where subdirectories were found, to list ahead of tree walks (see `walk`).
    pub(crate) walks: walk::Walks,
    /// Requests sent, by kind (see `stats`).
    pub(crate) stats: stats::Stats,
    /// Which lock owners may hold locks, so closes of the others cost nothing (see `locks`).
    pub(crate) locks: locks::Held,
    /// Set by [`Client::shut_down`]: every call fails from then on.
    shut_down: std::sync::atomic::AtomicBool,
    /// Makes the kernel forget what a recall names (see `recall`).
    kernel_invalidator: std::sync::OnceLock<recall::KernelInvalidator>,
    /// Whether cached state may be used (see `session`).
    session: session::Session,
    /// Bumped when every cached map must go (see `Client::data_generation`).
    map_epoch: std::sync::atomic::AtomicU64,
    /// Each file's server attributes when it was last opened: the kernel keeps the pages it
    /// cached (`keep_cache`) only when a new open finds the same (see `Client::open`).
    pub(crate) page_states: moka::sync::Cache<Ino, PageState>,
    /// Directories' generations when the kernel was last let list them into its own cache,
    /// kept for the map TTL (well within the read lease the listing brought); see
    /// `Client::open_dir`.
    pub(crate) dir_pages: moka::sync::Cache<Ino, u64>,
    /// Write lease recalls (file, epoch) that arrived before the answer to the create that
    /// brought the lease (see `Client::created`).
    pub(crate) early_recalls: moka::sync::Cache<Ino, u64>,
    /// Kernel reads in progress per file (see [`Client::reading`]).
    pub(crate) reads_in_flight: DashMap<Ino, u32>,
    /// Namespace changes answered here under the solo lease and not sent yet (see `deferred`).
    pub(crate) deferred: deferred::Deferred,
    /// This client, for the background tasks its calls start.
    me: std::sync::OnceLock<std::sync::Weak<Client>>,
}

/// The inodes whose cached attributes `req` makes stale: those it changes, except for the
/// access times of `Touch`, which every answer from a cache shows anyway (`Atimes::note`):
/// reading a file must not cost the listing that says it exists (see `deferred`).
pub(crate) fn cached_changes(req: &MetaRequest) -> Vec<Ino> {
    match req {
        MetaRequest::Touch { .. } => Vec::new(),
        _ => req.changed_inodes(),
    }
}

/// How many times a read that raced with a change is asked again (see `Client::call`).
const RACED_ASKS: usize = 4;

/// What a file looked like on the server when it was last opened: the kernel may keep its
/// pages only if a new open finds the same (see `Client::open`). Changes the kernel did not
/// see (a recall, a lapsed session) drop the entry instead (`forget_inode`, `forget_all`).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PageState {
    pub(crate) size: u64,
    pub(crate) mtime: Timestamp,
    pub(crate) ctime: Timestamp,
}

impl PageState {
    /// What `attr` tells of the file's data.
    pub(crate) fn of(attr: &Attr) -> PageState {
        PageState { size: attr.size, mtime: attr.mtime, ctime: attr.ctime }
    }
}

impl Client {
    /// Connects to the metadata server and checks that it serves `config.volume`.
    pub async fn connect(config: ClientConfig, identity: &Identity) -> Result<Arc<Client>> {
        let endpoint = cairn_net::client_endpoint(identity)?;
        let meta = RpcClient::new(endpoint.clone(), &config.meta, cairn_net::META_SERVER_NAME, config.timeout);
        let hello = MetaRequest::Hello { version: PROTOCOL_VERSION, volume: config.volume.clone() };
        let (volume, codec) = hello_answer(meta.call::<_, MetaResponse>(&hello).await?.0)?;
        let client = Client {
            blocks: blocks::BlockClient::new(endpoint, &config)?,
            files: DashMap::new(),
            generations: moka::sync::Cache::builder().time_to_live(config.map_ttl * 2).build(),
            write_budget: write::WriteBudget::new(config.write_buffer_bytes),
            write_behind: Arc::new(tokio::sync::Semaphore::new(write::WRITE_BEHIND)),
            unsynced: DashMap::new(),
            last_read: moka::sync::Cache::builder().max_capacity(10_000).time_to_idle(Duration::from_secs(10)).build(),
            maps: moka::future::Cache::builder().max_capacity(100_000).time_to_live(config.map_ttl).build(),
            no_xattrs: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(config.map_ttl).build(),
            xattr_misses: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(config.map_ttl).build(),
            xattrs_changed: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(config.map_ttl * 2).build(),
            sizes: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(config.map_ttl).build(),
            atimes: atime::Atimes::new(config.atime, config.diratime, config.map_ttl),
            compacting: dashmap::DashSet::new(),
            inode_flags: moka::sync::Cache::builder().max_capacity(100_000).build(),
            dir_attrs: moka::sync::Cache::builder().max_capacity(10_000).time_to_live(config.map_ttl).build(),
            listings: listing::Listings::new(config.map_ttl),
            walks: walk::Walks::new(config.map_ttl),
            file_attrs: attrs::FileAttrs::new(config.map_ttl),
            open_hints: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(config.map_ttl).build(),
            opens_in_dirs: moka::sync::Cache::builder().max_capacity(10_000).time_to_live(config.map_ttl).build(),
            stats: Default::default(),
            locks: Default::default(),
            shut_down: Default::default(),
            meta,
            volume,
            codec: std::sync::RwLock::new(Arc::new(codec)),
            kernel_invalidator: Default::default(),
            session: session::Session::new(),
            map_epoch: Default::default(),
            page_states: moka::sync::Cache::builder().max_capacity(100_000).build(),
            dir_pages: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(config.map_ttl).build(),
            early_recalls: moka::sync::Cache::builder().time_to_live(Duration::from_secs(60)).build(),
            reads_in_flight: DashMap::new(),
            deferred: deferred::Deferred::new(config.defer_namespace),
            me: Default::default(),
        };
        let client = Arc::new(client);
        let _ = client.me.set(Arc::downgrade(&client));
        client.meta.set_callbacks(Arc::new(recall::Callbacks(Arc::downgrade(&client))));
        tokio::spawn(session::renew_loop(Arc::downgrade(&client)));
        tokio::spawn(write::commit_loop(Arc::downgrade(&client)));
        Ok(client)
    }

    /// This client, shared, for a background task (`None` once it is being dropped).
    pub(crate) fn shared(&self) -> Option<Arc<Client>> {
        self.me.get()?.upgrade()
    }

    /// The volume's constants as the metadata server reported them.
    pub fn volume(&self) -> &VolumeInfo {
        &self.volume
    }

    /// The key under which `ino`'s chunk maps are cached now: its own generation (bumped
    /// when its data changes) and, in the high bits, the epoch bumped when all maps go.
    pub(crate) fn data_generation(&self, ino: Ino) -> u64 {
        let all = self.map_epoch.load(std::sync::atomic::Ordering::Acquire);
        (all << 32) | self.generations.get(&ino).unwrap_or(0)
    }

    /// Forgets cached maps of a file whose data changed.
    pub(crate) fn invalidate_data(&self, ino: Ino) {
        self.generations.entry(ino).and_upsert_with(|g| g.map_or(1, |g| g.into_value() + 1));
    }

    pub(crate) async fn call(&self, req: MetaRequest) -> Result<MetaResponse> {
        // A plain read whose answer raced with a change of what it describes (a recall, or
        // this client's own) is asked again: the answer may predate the change, and callers
        // cache what they get (reads clip at the size an answer leaves in `sizes`, so a size
        // from before this client's own commit would cut its new data short). An open is not
        // asked again, as it registers a handle: its attributes are.
        match req {
            MetaRequest::GetAttr { .. } | MetaRequest::Lookup { .. } | MetaRequest::ReadDir { .. } => {
                self.call_unraced(&req).await
            }
            MetaRequest::Open { ino } => {
                let (resp, sent) = self.call_once(&req).await;
                match resp? {
                    MetaResponse::Opened { first_map, .. } if self.listings.changed_since(ino, sent) => {
                        match self.call_unraced(&MetaRequest::GetAttr { ino }).await? {
                            MetaResponse::Attr(attr) => Ok(MetaResponse::Opened { attr, first_map }),
                            other => Err(unexpected(other)),
                        }
                    }
                    other => Ok(other),
                }
            }
            _ => self.call_once(&req).await.0,
        }
    }

    /// Sends a plain read until its answer did not race with a change of what it describes.
    /// Asking once more is not always enough: the change (a commit sent just before) may
    /// still be on its way when the second answer is read.
    async fn call_unraced(&self, req: &MetaRequest) -> Result<MetaResponse> {
        let raced = |r: &MetaResponse, sent| r.described_inodes().iter().any(|i| self.listings.changed_since(*i, sent));
        let (mut resp, mut sent) = self.call_once(req).await;
        for _ in 0..RACED_ASKS {
            match &resp {
                Ok(r) if raced(r, sent) => (resp, sent) = self.call_once(req).await,
                _ => break,
            }
        }
        resp
    }

    /// Sends `req` to the metadata server as it is. Any answer (not a transport failure)
    /// shows the session alive; if it had lapsed meanwhile, recalls may have been missed, so
    /// every cache is dropped.
    async fn send_meta(&self, req: &MetaRequest) -> Result<MetaResponse> {
        self.stats.count("meta", req.into());
        let sent = self.session.now();
        let resp = self.meta.call::<_, MetaResponse>(req).await.map(|r| r.0).map_err(ClientError::from);
        let answered = match &resp {
            Ok(_) => true,
            Err(e) => !e.unanswered(),
        };
        if answered && self.session.answered(sent) {
            self.forget_all();
        }
        resp
    }

    /// Sends one request and updates the caches it concerns; returns the answer and the
    /// epoch it was sent at.
    async fn call_once(&self, req: &MetaRequest) -> (Result<MetaResponse>, u64) {
        if let Err(e) = self.check_up() {
            return (Err(e), 0);
        }
        // Answered here and sent later under the solo lease, or sent once every change
        // answered so is applied (see `deferred`).
        let local = self.defer_or_list(req).await;
        let answered_here = local.is_some();
        if !answered_here {
            self.drain_for(req).await;
        }
        self.forget_dir_attrs(req, None);
        let sent_at = std::time::Instant::now();
        let sent = self.listings.before(req);
        self.file_attrs.forget(req, None, sent);
        let resp = match local {
            Some(resp) => Ok(resp),
            None => self.send_meta(req).await,
        };
        // Attributes in the answer are this client's latest word on their inode unless
        // another of its requests changed it since this one was sent.
        let latest = match &resp {
            Ok(
                MetaResponse::Attr(a) | MetaResponse::Opened { attr: a, .. } | MetaResponse::Committed { attr: a, .. },
            )
            | Ok(MetaResponse::Changed { attr: Some(a), .. }) => Some(a.clone()),
            _ => None,
        }
        .filter(|a| !self.listings.changed_since(a.ino, sent));
        let answered = self.listings.after(req, sent, &resp);
        // What the server answered about a file nothing else changed meanwhile is what an
        // open of it would answer until the next mark; so is what this client answered for a
        // create (an empty file that `git status` may read back). An open answered here
        // came from such a hint already.
        let hint = !answered_here || matches!(req, MetaRequest::MakeNode { .. });
        if let (Ok(resp), Some(_), true) = (&resp, &latest, hint) {
            self.note_open_answer(req, resp, answered);
        }
        self.forget_dir_attrs(req, Some(&resp));
        self.file_attrs.forget(req, Some(&resp), self.listings.next_epoch());
        match latest {
            Some(a) if a.kind == FileKind::Dir => self.keep_dir_attr(self.note_attr(a)),
            Some(a) => self.file_attrs.keep(&a, sent, sent_at),
            None => {}
        }
        (resp, sent)
    }

    /// Ends the session with the metadata server (at unmount), so that it drops this
    /// client's leases at once instead of when the connection times out.
    pub async fn disconnect(&self) {
        self.drain_deferred().await;
        self.meta.close().await;
    }

    /// Shuts this client down, as a local filesystem does on a fatal error or an
    /// administrator's `XFS_IOC_GOINGDOWN` (xfstests' `godown`): from now on every call fails
    /// with EIO and data not yet committed is never committed, so what survives is exactly
    /// what a crash of this client would leave. Unmounting ends the state.
    pub fn shut_down(&self) {
        self.shut_down.store(true, std::sync::atomic::Ordering::Release);
        tracing::warn!("the filesystem was shut down: every call fails with EIO until it is unmounted");
    }

    /// The current block codec.
    pub(crate) fn codec(&self) -> Arc<cairn_block::Codec> {
        self.codec.read().expect("codec lock").clone()
    }

    /// Fetches the volume keys again, for a block encrypted under a key added (`cairn
    /// key-rotate`) after this client connected; from then on it encrypts with that key too.
    pub(crate) async fn refresh_codec(&self) -> Result<()> {
        let hello = MetaRequest::Hello { version: PROTOCOL_VERSION, volume: self.volume.name.clone() };
        let (_, codec) = hello_answer(self.call(hello).await?)?;
        *self.codec.write().expect("codec lock") = Arc::new(codec);
        Ok(())
    }

    /// The requests this client has sent, by kind, as `server.kind count` lines.
    pub fn stats_report(&self) -> String {
        self.stats.report()
    }

    /// The `chattr` flags last seen on `ino`.
    pub(crate) fn flags_of(&self, ino: Ino) -> u32 {
        self.check_session();
        self.inode_flags.get(&ino).unwrap_or(0)
    }

    /// EIO once the client was shut down.
    pub(crate) fn check_up(&self) -> Result<()> {
        match self.shut_down.load(std::sync::atomic::Ordering::Acquire) {
            true => Err(ClientError::new(ErrorCode::Io, "the filesystem was shut down; unmount it")),
            false => Ok(()),
        }
    }

    pub(crate) async fn call_attr(&self, req: MetaRequest) -> Result<Attr> {
        match self.call(req).await? {
            MetaResponse::Attr(a) | MetaResponse::Committed { attr: a, .. } => Ok(self.note_attr(a)),
            other => Err(unexpected(other)),
        }
    }

    /// Attributes straight from the server, not through [`Client::note_attr`]: for background
    /// work whose answer may be older than a commit this client makes meanwhile, and must not
    /// replace the cached size.
    pub(crate) async fn server_attr(&self, ino: Ino) -> Result<Attr> {
        match self.call(MetaRequest::GetAttr { ino }).await? {
            MetaResponse::Attr(a) => Ok(a),
            other => Err(unexpected(other)),
        }
    }

    /// Sends a namespace change; records the directories it touched (see `dir_attrs`) and
    /// returns the node's attributes, if it has one.
    pub(crate) async fn call_changed(&self, req: MetaRequest) -> Result<Option<Attr>> {
        match self.call(req).await? {
            MetaResponse::Changed { attr, dirs, .. } => {
                for d in dirs {
                    self.keep_dir_attr(self.note_attr(d));
                }
                Ok(attr.map(|a| self.note_attr(a)))
            }
            other => Err(unexpected(other)),
        }
    }

    /// Keeps a directory's attributes from an answer (see `dir_attrs`). Answers of concurrent
    /// requests may arrive out of order: the newest is kept.
    pub(crate) fn keep_dir_attr(&self, d: Attr) {
        if self.dir_attrs.get(&d.ino).is_none_or(|old| old.ctime <= d.ctime) {
            self.dir_attrs.insert(d.ino, d);
        }
    }

    /// Drops the recorded directory attributes a request may change without reporting them:
    /// when it is sent, those it names; when it is answered (`answer`), the directories an
    /// rmdir or rename removed or moved, or all of them if it got no answer.
    fn forget_dir_attrs(&self, req: &MetaRequest, answer: Option<&Result<MetaResponse>>) {
        match (req, answer) {
            (
                MetaRequest::SetAttr { ino, .. }
                | MetaRequest::SetXattr { ino, .. }
                | MetaRequest::RemoveXattr { ino, .. },
                None,
            ) => self.dir_attrs.invalidate(ino),
            (MetaRequest::Rmdir { .. } | MetaRequest::Rename { .. }, Some(answer)) => match answer {
                Ok(MetaResponse::Changed { unnamed, .. }) => {
                    unnamed.iter().for_each(|ino| self.dir_attrs.invalidate(ino))
                }
                Err(e) if e.unanswered() => self.dir_attrs.invalidate_all(),
                _ => {}
            },
            _ => {}
        }
    }

    pub(crate) async fn call_empty(&self, req: MetaRequest) -> Result<()> {
        match self.call(req).await? {
            MetaResponse::Empty => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Records a fresh attribute from the server and overlays what is still buffered locally.
    pub(crate) fn note_attr(&self, mut a: Attr) -> Attr {
        if a.kind == FileKind::File {
            if let Some(f) = self.files.get(&a.ino) {
                a.size = a.size.max(f.buffered_size());
                a.stored = (a.stored + f.buffered_bytes()).min(a.size);
                if let Some(t) = f.buffered_mtime() {
                    a.mtime = a.mtime.max(t);
                    a.ctime = a.ctime.max(t);
                }
                // Made after the buffered writes, so they win over them.
                if let Some(set) = f.pending_attrs() {
                    write::overlay_attrs(&mut a, &set);
                }
            }
            self.sizes.insert(a.ino, a.size);
        }
        self.atimes.note(&mut a);
        match a.flags {
            0 => self.inode_flags.invalidate(&a.ino),
            f => self.inode_flags.insert(a.ino, f),
        }
        if a.has_xattrs {
            self.no_xattrs.invalidate(&a.ino);
        } else if !self.xattrs_changed.contains_key(&a.ino) {
            self.no_xattrs.insert(a.ino, ());
        }
        a
    }
}

/// The volume and its block codec from the metadata server's answer to `Hello`: the volume's
/// compression, and its keys when it is encrypted (new blocks are encrypted under the newest
/// key; older ones still decode).
fn hello_answer(resp: MetaResponse) -> Result<(VolumeInfo, cairn_block::Codec)> {
    let MetaResponse::Hello { volume, keys } = resp else { return Err(unexpected(resp)) };
    let encrypt_with = match (volume.encrypted, keys.last()) {
        (false, _) => None,
        (true, Some((id, _))) => Some(*id),
        (true, None) => {
            let msg = "the volume is encrypted but the metadata server gave no keys (is this a client certificate?)";
            return Err(ClientError::new(ErrorCode::Access, msg));
        }
    };
    let codec = cairn_block::Codec::new(volume.compression, &keys, encrypt_with)
        .map_err(|e| ClientError::new(ErrorCode::Io, e.to_string()))?;
    Ok((volume, codec))
}

pub(crate) fn unexpected(resp: MetaResponse) -> ClientError {
    ClientError::new(ErrorCode::Io, format!("unexpected answer from the metadata server: {resp:?}"))
}

/// Attributes for unit tests: a `kind` inode with `nlink` links, every time 1 s.
#[cfg(test)]
pub(crate) fn test_attr(ino: Ino, kind: FileKind, nlink: u32) -> Attr {
    let t = Timestamp { secs: 1, nanos: 0 };
    Attr {
        ino,
        kind,
        perm: 0o644,
        nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        size: 0,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        has_xattrs: false,
        stored: 0,
        flags: 0,
    }
}
