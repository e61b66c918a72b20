//! Requests to the metadata server and their responses.

use crate::WireError;
use crate::types::*;
use serde::{Deserialize, Serialize};

/// Who is asking: the caller's credentials, used for ownership of new inodes and permission checks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, where a decision needs them (clearing setgid after fallocate or
    /// an ACL change by someone outside the file's group); empty otherwise.
    pub groups: Vec<u32>,
}

impl Caller {
    /// Whether the caller is root or in group `gid` (`in_group_or_capable` in Linux).
    pub fn in_group_or_root(&self, gid: u32) -> bool {
        self.uid == 0 || self.gid == gid || self.groups.contains(&gid)
    }
}

/// Attribute changes for `SetAttr`; `None` leaves a field alone.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct SetAttrs {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Timestamp>,
    /// New `chattr` flags (`inode_flags`); the only change allowed on a locked inode.
    pub flags: Option<u32>,
}

/// How `Rename` treats an existing target (Linux `renameat2` flags).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum RenameMode {
    /// Replace the target if it exists (plain `rename`).
    Replace,
    /// Fail with `EEXIST` if the target exists (`RENAME_NOREPLACE`).
    NoReplace,
    /// Swap source and target atomically; both must exist (`RENAME_EXCHANGE`).
    Exchange,
    /// Like `Replace` (or `NoReplace`), and leave a whiteout (a 0:0 character device owned
    /// by the caller) in the source's place (`RENAME_WHITEOUT`, used by overlayfs).
    Whiteout { no_replace: bool, caller: Caller },
}

/// `setxattr` flags.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrMode {
    /// Create or replace.
    Any,
    /// `XATTR_CREATE`: fail with `EEXIST` if present.
    Create,
    /// `XATTR_REPLACE`: fail with `ENODATA` if absent.
    Replace,
}

/// `fallocate` operations the metadata server understands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallocMode {
    /// Mode 0: extend the size to cover the range.
    Allocate,
    /// `FALLOC_FL_KEEP_SIZE`: reserve without changing the size (a no-op on sparse storage).
    KeepSize,
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: the range reads as zeros afterwards.
    PunchHole,
    /// `FALLOC_FL_ZERO_RANGE`: zeros, extending the size unless `keep_size`.
    ZeroRange { keep_size: bool },
}

/// The kind of a byte-range or flock lock (`F_RDLCK`, `F_WRLCK`, `F_UNLCK`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockKind {
    /// Shared: any number of owners may hold overlapping read locks.
    Read,
    /// Exclusive: conflicts with every other owner's lock on an overlapping range.
    Write,
    /// Releases the range (only in `SetLock`).
    Unlock,
}

/// A lock another owner holds, as `F_GETLK` reports it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockInfo {
    pub kind: LockKind,
    /// First byte.
    pub start: u64,
    /// Last byte, inclusive; the kernel's `OFFSET_MAX` (`i64::MAX`) stands for "to the end of
    /// the file, however long it grows".
    pub end: u64,
    /// The holder's process id on its own machine, as given when it locked.
    pub pid: u32,
}

/// A request to the metadata server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, strum::IntoStaticStr)]
pub enum MetaRequest {
    /// First call of a client session: checks versions and the volume name.
    Hello {
        version: u32,
        volume: String,
    },
    Lookup {
        parent: Ino,
        name: Vec<u8>,
    },
    GetAttr {
        ino: Ino,
    },
    SetAttr {
        ino: Ino,
        set: SetAttrs,
        caller: Caller,
    },
    /// Creates a file, directory, node or symlink (`target` is set for symlinks).
    MakeNode {
        parent: Ino,
        name: Vec<u8>,
        kind: FileKind,
        perm: u32,
        rdev: u32,
        target: Option<Vec<u8>>,
        caller: Caller,
        /// The creator's umask, applied unless the directory has a default ACL (which then
        /// decides the permissions instead).
        umask: u32,
        /// Register an open handle on the new inode in the same transaction (`create`).
        open: bool,
    },
    Link {
        ino: Ino,
        new_parent: Ino,
        new_name: Vec<u8>,
    },
    Unlink {
        parent: Ino,
        name: Vec<u8>,
    },
    Rmdir {
        parent: Ino,
        name: Vec<u8>,
    },
    Rename {
        parent: Ino,
        name: Vec<u8>,
        new_parent: Ino,
        new_name: Vec<u8>,
        mode: RenameMode,
    },
    ReadLink {
        ino: Ino,
    },
    /// Entries with cookie greater than `after`, at most `limit`.
    ReadDir {
        ino: Ino,
        after: u64,
        limit: u32,
        plus: bool,
    },
    /// Registers an open handle so an unlinked inode lives until its last close. Answered
    /// with `Opened`.
    Open {
        ino: Ino,
    },
    /// Drops an open handle registered by `Open` or `MakeNode { open: true }`.
    Close {
        ino: Ino,
    },
    /// The slices of one chunk in commit order (later ones shadow earlier ones).
    ReadMap {
        ino: Ino,
        chunk: u64,
    },
    /// Reserves `count` consecutive slice ids.
    AllocSlices {
        count: u64,
    },
    /// Adds stored slices to a file and raises its size to at least `min_size`; with `durable`,
    /// the commit is on disk before the answer (fsync). Refused with `LeaseLost` unless
    /// `lease` is the file's current write lease epoch (from `WriteLease`, or
    /// [`FIRST_LEASE`] for a file this client created open): a writer that lost its lease
    /// (it did not answer a recall in time) cannot overwrite what was written since.
    /// Answered with `Committed`.
    Commit {
        ino: Ino,
        slices: Vec<NewSlice>,
        min_size: u64,
        durable: bool,
        lease: u64,
        /// When the writer last wrote these slices: the file's new mtime and ctime, as a
        /// local filesystem sets them at the write, not when write-behind commits it later
        /// (`git` and `make` compare mtimes they saw right after the close). `None`, or no
        /// slices: the server's clock, or times left as they are.
        written_at: Option<Timestamp>,
        /// Mode, owner and mtime changes made after these writes (buffered with them under
        /// the write lease), applied in the same transaction as if by a `SetAttr` right
        /// after: `tar x` sets all three on every file it writes. Only `perm`, `uid`, `gid`,
        /// `mtime` and `ctime` may be set; refused with `EPERM` (and nothing applied) if the
        /// file is immutable or append-only.
        attrs: Option<SetAttrs>,
    },
    /// Asks for the exclusive write lease on a file before buffering writes to it: other
    /// clients' cached state of it is recalled first (and another writer flushes), so a read
    /// elsewhere that starts after a buffered write returned finds the server holding the
    /// lease and recalls it, flushing the write. Answered with `Lease`.
    WriteLease {
        ino: Ino,
    },
    /// Makes every earlier metadata change durable (fsync of a directory, syncfs).
    Sync,
    /// Allocates, punches or zeroes a range; a caller other than root clears setuid (and
    /// setgid where Linux would), as a write does.
    Fallocate {
        ino: Ino,
        mode: FallocMode,
        offset: u64,
        len: u64,
        caller: Caller,
    },
    /// Sets an xattr. Setting the access ACL also sets the permission bits it implies, and
    /// clears setgid unless `caller` is root or in the file's group.
    SetXattr {
        ino: Ino,
        name: Vec<u8>,
        value: Vec<u8>,
        mode: XattrMode,
        caller: Caller,
    },
    GetXattr {
        ino: Ino,
        name: Vec<u8>,
    },
    ListXattr {
        ino: Ino,
    },
    RemoveXattr {
        ino: Ino,
        name: Vec<u8>,
    },
    StatFs,
    /// Nothing but a sign of life: a client whose other requests pause sends it about every
    /// second, so the server knows its leases are still in use (see `cairn-meta` `leases`).
    Renew,
    /// Chunk servers known to the cluster.
    ListServers,
    /// A chunk server announces itself (on start and on every heartbeat).
    Heartbeat {
        id: ServerId,
        addr: String,
        /// Failure domain: copies of a block go to distinct zones.
        zone: String,
        capacity: u64,
        free: u64,
        /// Slices of which this server found a corrupt block (scrub or a read) since the
        /// last heartbeat that got through, for the metadata server to repair.
        bad: Vec<SliceId>,
    },
    /// Starts (or with `drain: false` stops) emptying chunk server `id`: it gets no new
    /// copies and its copies are moved elsewhere (`cairn chunk drain`).
    Drain {
        id: ServerId,
        drain: bool,
    },
    /// Checks the namespace and the slice tables for inconsistencies (`cairn fsck`).
    Fsck,
    /// Reconciles every live chunk server now instead of in turn: lists its blocks and
    /// deletes the copies no file references that have waited out the grace period
    /// (`cairn gc`).
    Gc,
    /// Records read accesses: the kernel leaves atime to FUSE filesystems, and the client
    /// applies the mount's atime rule before sending this, gathering many in one request.
    /// Never changes ctime.
    Touch {
        times: Vec<(Ino, Timestamp)>,
    },
    /// Replaces the slices that lie entirely inside `[slice.pos, slice.pos + slice.len)` of a
    /// chunk by `slice`, which holds that range's bytes as of commit position `seq` (from
    /// `ReadMap`). Refused with `Busy` if anything newer than `seq` overlaps the range. File
    /// contents, size and times do not change: this only bounds how many slices a read has
    /// to resolve after many small writes.
    Compact {
        ino: Ino,
        chunk: u64,
        seq: u64,
        slice: SliceRef,
    },
    /// `F_GETLK`: the first lock of another owner that conflicts with a `kind` lock on
    /// `[start, end]`, if any. `owner` is the FUSE lock owner; the server makes it unique by
    /// pairing it with the connection. Answered with `Lock`.
    GetLock {
        ino: Ino,
        owner: u64,
        start: u64,
        end: u64,
        kind: LockKind,
    },
    /// Sets, changes or releases a lock (`F_SETLK`, `flock`). `flock` locks are whole-file and
    /// live apart from byte-range locks, as on Linux. With `wait_ms > 0` the server waits that
    /// long for a conflicting lock to go away before refusing with `WouldBlock`; the client
    /// repeats short waits (so a signal can interrupt it between them) instead of one long
    /// one. A wait that would close a cycle of waiting owners is refused with `Deadlock`.
    /// Answered with `LockHeld`. While the server waits for clients to reclaim their locks
    /// after a restart, a lock (not an unlock) is refused with `Grace`: ask again shortly.
    SetLock {
        ino: Ino,
        owner: u64,
        start: u64,
        end: u64,
        kind: LockKind,
        pid: u32,
        flock: bool,
        wait_ms: u32,
    },
    /// Takes back, on a new connection, the locks this client held on its previous one
    /// (as `LockHeld` answers reported them). Granted only during the grace period that
    /// follows a metadata server's start, when nobody else may take a lock, so no other
    /// owner can have held one of them in between. Answered with `Reclaimed`.
    ReclaimLocks {
        locks: Vec<OwnedLocks>,
    },
    /// Asks for the solo lease: granted (`Solo(Some(epoch))`) only to a client that is the
    /// volume's only client. Its holder may answer namespace changes itself and send them
    /// later as `Deferred` (see `cairn-client`'s `deferred`); any other client's first request
    /// recalls it (`Callback::RecallSolo`), and is served once the holder sent them all.
    Solo,
    /// Reserves `count` inode numbers for the asker's deferred creations; answered with
    /// `Inodes`.
    ReserveInodes {
        count: u32,
    },
    /// Namespace changes (and opens and closes) the solo lease holder already answered
    /// itself, in the order it made them; `first` numbers the first (changes are numbered from 1 within an epoch), so
    /// changes sent again after a lost connection are applied once. Refused whole with
    /// `LeaseLost` unless `epoch` is the current solo lease. Answered with `Applied`.
    Deferred {
        epoch: u64,
        first: u64,
        changes: Vec<DeferredChange>,
    },
}

/// One namespace change made under the solo lease: a `MakeNode` (creating inode `ino`, from
/// a reserved range), `Unlink`, `Rmdir`, `Rename` or `Close`, made at time `at`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeferredChange {
    pub at: Timestamp,
    pub ino: Ino,
    pub req: MetaRequest,
}

/// One owner's locks of one namespace (flock or byte range) on one inode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct OwnedLocks {
    pub ino: Ino,
    pub owner: u64,
    pub flock: bool,
    pub held: Vec<LockInfo>,
}

impl MetaRequest {
    /// The inodes whose attributes (or data) this request may change. Every request is
    /// named, so a new one cannot be forgotten here.
    pub fn changed_inodes(&self) -> Vec<Ino> {
        use MetaRequest as R;
        match self {
            R::SetAttr { ino, .. }
            | R::Commit { ino, .. }
            | R::WriteLease { ino }
            | R::Fallocate { ino, .. }
            | R::SetXattr { ino, .. }
            | R::RemoveXattr { ino, .. }
            | R::Compact { ino, .. }
            | R::Link { ino, .. } => vec![*ino],
            R::Touch { times } => times.iter().map(|(ino, _)| *ino).collect(),
            R::Hello { .. }
            | R::Lookup { .. }
            | R::GetAttr { .. }
            | R::MakeNode { .. }
            | R::Unlink { .. }
            | R::Rmdir { .. }
            | R::Rename { .. }
            | R::ReadLink { .. }
            | R::ReadDir { .. }
            | R::Open { .. }
            | R::Close { .. }
            | R::ReadMap { .. }
            | R::AllocSlices { .. }
            | R::Sync
            | R::GetXattr { .. }
            | R::ListXattr { .. }
            | R::StatFs
            | R::Renew
            | R::ListServers
            | R::Heartbeat { .. }
            | R::Drain { .. }
            | R::Fsck
            | R::Gc
            | R::GetLock { .. }
            | R::SetLock { .. }
            | R::ReclaimLocks { .. }
            | R::Solo
            | R::ReserveInodes { .. }
            | R::Deferred { .. } => Vec::new(),
        }
    }

    /// The (directory, name) pairs whose entries this request may change (the directories'
    /// attributes change with them).
    pub fn changed_names(&self) -> Vec<(Ino, &[u8])> {
        use MetaRequest as R;
        match self {
            R::MakeNode { parent, name, .. } | R::Unlink { parent, name } | R::Rmdir { parent, name } => {
                vec![(*parent, name)]
            }
            R::Link { new_parent, new_name, .. } => vec![(*new_parent, new_name)],
            R::Rename { parent, name, new_parent, new_name, .. } => vec![(*parent, name), (*new_parent, new_name)],
            _ => Vec::new(),
        }
    }

    /// The inodes whose attributes, data map or (for a directory) entries the answer tells
    /// about, so the asker may cache them: it holds a read lease on each, which another
    /// client's change recalls. (Answers name more: see `MetaResponse::described_inodes`.)
    pub fn read_inodes(&self) -> Vec<Ino> {
        use MetaRequest as R;
        match self {
            R::Lookup { parent, .. }
            | R::MakeNode { parent, .. }
            | R::Unlink { parent, .. }
            | R::Rmdir { parent, .. } => vec![*parent],
            R::Rename { parent, new_parent, .. } => vec![*parent, *new_parent],
            R::Link { ino, new_parent, .. } => vec![*ino, *new_parent],
            R::GetAttr { ino }
            | R::SetAttr { ino, .. }
            | R::ReadDir { ino, .. }
            | R::Open { ino }
            | R::ReadMap { ino, .. }
            | R::Commit { ino, .. }
            | R::WriteLease { ino }
            | R::Fallocate { ino, .. }
            | R::GetXattr { ino, .. }
            | R::ListXattr { ino }
            | R::SetXattr { ino, .. }
            | R::RemoveXattr { ino, .. } => vec![*ino],
            _ => Vec::new(),
        }
    }
}

/// A successful answer from the metadata server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum MetaResponse {
    Hello {
        volume: VolumeInfo,
        /// The volume keys by id, newest last, when the volume is encrypted and the peer is a
        /// client (chunk servers never get them).
        keys: Vec<(u16, [u8; 32])>,
    },
    Attr(Attr),
    Empty,
    /// A write lease: its epoch (to send with every `Commit`) and the file's attributes.
    Lease {
        epoch: u64,
        attr: Attr,
    },
    /// What a namespace change (make node, link, unlink, rmdir, rename) left: the node's
    /// attributes where it has one (and for a rename the client answered itself under the
    /// solo lease, the moved inode's), and those of every directory it touched, so the
    /// client need not ask for them again.
    Changed {
        attr: Option<Attr>,
        dirs: Vec<Attr>,
        /// Inodes whose link count or ctime an unlink, rmdir or rename changed without the
        /// request naming them (the removed, moved or replaced ones), so that caches drop
        /// exactly those instead of everything.
        unnamed: Vec<Ino>,
    },
    /// An opened inode's attributes and, for a file with data, the map of its first chunk:
    /// reading a small file then takes no further metadata round trip.
    Opened {
        attr: Attr,
        first_map: Option<Vec<SliceRef>>,
    },
    /// A committed file's attributes and, for a file of at most 1 MiB, the map of its first
    /// chunk: what an open would answer (the client can then open it without asking).
    Committed {
        attr: Attr,
        first_map: Option<Vec<SliceRef>>,
    },
    Link(Vec<u8>),
    Dir(Vec<DirEntry>),
    /// A chunk's slices in commit order, and the commit position of the newest (0 if none),
    /// which `Compact` uses to detect a change in between.
    Map {
        slices: Vec<SliceRef>,
        seq: u64,
    },
    SliceIds {
        first: SliceId,
    },
    Xattr(Vec<u8>),
    XattrNames(Vec<Vec<u8>>),
    StatFs(FsStats),
    Servers(Vec<ChunkServerInfo>),
    Fsck(FsckReport),
    Gc(GcReport),
    /// `GetLock`: the conflicting lock, or `None` if the asked lock could be set now.
    Lock(Option<LockInfo>),
    /// `SetLock` succeeded; the locks of that kind (flock or byte range) the owner now holds
    /// on the inode, which the client keeps to reclaim them after a server restart.
    LockHeld(Vec<LockInfo>),
    /// `ReclaimLocks`: for each owner's locks, in the order asked, whether they are held again.
    Reclaimed(Vec<bool>),
    /// `Solo`: the solo lease's epoch, or `None`: another client is connected.
    Solo(Option<u64>),
    /// `ReserveInodes`: the first of the inode numbers reserved.
    Inodes {
        first: Ino,
    },
    /// `Deferred`: the changes the server could not apply (by their number), with why. The
    /// holder answered them already; it reports them and drops its caches.
    Applied(Vec<(u64, WireError)>),
}

impl MetaResponse {
    /// The inodes whose attributes this answer carries (which the asker then caches).
    pub fn described_inodes(&self) -> Vec<Ino> {
        match self {
            MetaResponse::Attr(a)
            | MetaResponse::Opened { attr: a, .. }
            | MetaResponse::Committed { attr: a, .. }
            | MetaResponse::Lease { attr: a, .. } => {
                vec![a.ino]
            }
            MetaResponse::Changed { attr, dirs, .. } => attr.iter().chain(dirs).map(|a| a.ino).collect(),
            MetaResponse::Dir(entries) => entries.iter().filter_map(|e| e.attr.as_ref().map(|a| a.ino)).collect(),
            _ => Vec::new(),
        }
    }
}
