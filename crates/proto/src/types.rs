//! Value types shared by all services: inode numbers, attributes, file kinds, limits.

use serde::{Deserialize, Serialize};

/// Inode number. The root directory is always [`ROOT_INO`].
pub type Ino = u64;
/// Root directory inode.
pub const ROOT_INO: Ino = 1;
/// Longest file name in bytes (POSIX `NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Longest symlink target in bytes (Linux `PATH_MAX` minus the NUL).
pub const SYMLINK_MAX: usize = 4095;
/// Longest xattr name in bytes (Linux `XATTR_NAME_MAX`).
pub const XATTR_NAME_MAX: usize = 255;
/// Largest xattr value in bytes (Linux `XATTR_SIZE_MAX`).
pub const XATTR_SIZE_MAX: usize = 65536;
/// True for the one xattr Cairn does not store, `security.selinux`, refused with EOPNOTSUPP
/// as on a filesystem without labels. SELinux labels a FUSE mount as a whole (`genfscon`),
/// never by per-file labels, while `ls -l` asks every file for its label, one kernel round
/// trip each, and stops asking only on a filesystem that answers EOPNOTSUPP.
pub fn xattr_unsupported(name: &[u8]) -> bool {
    name == b"security.selinux"
}
/// Largest file size Cairn accepts (matches ext4's 16 TiB so tools behave the same).
pub const MAX_FILE_SIZE: u64 = 1 << 44;

/// Identifier of a slice: one flushed write, stored as immutable blocks. 0 means "zeros" (a hole).
pub type SliceId = u64;
/// Slice id that stands for a hole: reads of it return zeros and nothing is stored.
pub const HOLE_SLICE: SliceId = 0;
/// Identifier of a registered chunk server.
pub type ServerId = u64;

/// What kind of object an inode is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum FileKind {
    #[default]
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl FileKind {
    /// The `S_IFMT` bits for this kind.
    pub fn type_bits(self) -> u32 {
        match self {
            FileKind::File => libc::S_IFREG,
            FileKind::Dir => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
            FileKind::CharDev => libc::S_IFCHR,
            FileKind::BlockDev => libc::S_IFBLK,
        }
    }

    /// Kind from the `S_IFMT` bits of a mode, if they name one.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => FileKind::File,
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDev,
            libc::S_IFBLK => FileKind::BlockDev,
            _ => return None,
        })
    }

    /// Stable small integer used in the SQL schema.
    pub fn to_i64(self) -> i64 {
        self as i64
    }

    /// Inverse of [`FileKind::to_i64`].
    pub fn from_i64(v: i64) -> Option<FileKind> {
        [
            FileKind::File,
            FileKind::Dir,
            FileKind::Symlink,
            FileKind::Fifo,
            FileKind::Socket,
            FileKind::CharDev,
            FileKind::BlockDev,
        ]
        .get(usize::try_from(v).ok()?)
        .copied()
    }
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Timestamp { secs: d.as_secs() as i64, nanos: d.subsec_nanos() }
    }

    /// Conversion for APIs that want `SystemTime`.
    pub fn to_system_time(self) -> std::time::SystemTime {
        if self.secs >= 0 {
            std::time::UNIX_EPOCH + std::time::Duration::new(self.secs as u64, self.nanos)
        } else {
            std::time::UNIX_EPOCH - std::time::Duration::from_secs(self.secs.unsigned_abs())
                + std::time::Duration::from_nanos(self.nanos as u64)
        }
    }

    /// Conversion from `SystemTime` (times before 1970 are supported).
    pub fn from_system_time(t: std::time::SystemTime) -> Timestamp {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Timestamp { secs: d.as_secs() as i64, nanos: d.subsec_nanos() },
            Err(e) => {
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nanos = d.subsec_nanos();
                if nanos > 0 {
                    secs -= 1;
                    nanos = 1_000_000_000 - nanos;
                }
                Timestamp { secs, nanos }
            }
        }
    }
}

/// Everything `stat` reports about an inode (the default: an empty file, inode 0, mode 0, at
/// the epoch, for building test values).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (no `S_IFMT` bits).
    pub perm: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    /// Whether the inode has any extended attribute (lets clients answer misses locally).
    pub has_xattrs: bool,
    /// Bytes of data a file's slices hold (holes excluded; overwritten bytes count until
    /// compaction): what `st_blocks` reports, capped at the size, so sparse files look sparse.
    pub stored: u64,
    /// `chattr` flags ([`inode_flags`]).
    pub flags: u32,
}

/// Inode flags set with `chattr` (FS_IOC_SETFLAGS / FS_IOC_FSSETXATTR), as Linux's FS_*_FL
/// bits. Only these are supported; the metadata server enforces immutable and append-only.
pub mod inode_flags {
    /// Writes are synchronous (`chattr +S`): stored, not acted on (every fsync is honoured).
    pub const SYNC: u32 = 0x08;
    /// Nothing may change the inode or its data, nor link, unlink or rename it (`+i`).
    pub const IMMUTABLE: u32 = 0x10;
    /// Data may only be appended; no unlink, rename, truncate or attribute change (`+a`).
    pub const APPEND: u32 = 0x20;
    /// Not to be dumped by backup tools (`+d`): stored only.
    pub const NODUMP: u32 = 0x40;
    /// Reads do not update atime (`+A`).
    pub const NOATIME: u32 = 0x80;
    /// Every supported flag.
    pub const SUPPORTED: u32 = SYNC | IMMUTABLE | APPEND | NODUMP | NOATIME;
    /// Flags that forbid changing the inode.
    pub const LOCKED: u32 = IMMUTABLE | APPEND;
}

/// A new value for a timestamp in `SetAttr`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    /// The server's current time (`UTIME_NOW`).
    Now,
    /// An explicit time.
    At(Timestamp),
}

impl TimeSet {
    /// The time this sets, with `now` standing for `UTIME_NOW`.
    pub fn resolve(self, now: Timestamp) -> Timestamp {
        match self {
            TimeSet::Now => now,
            TimeSet::At(t) => t,
        }
    }
}

/// One directory entry as returned by `ReadDir`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: FileKind,
    /// Cookie to pass back as `offset` to continue after this entry.
    pub cookie: u64,
    /// Present when the request asked for attributes (readdirplus).
    pub attr: Option<Attr>,
    /// With attributes, for a small file: its first chunk's map as of the listing, so a
    /// client can start fetching the data while it opens the file (the open's own map,
    /// which may be newer, is what reads use).
    pub first_map: Option<Vec<SliceRef>>,
}

/// A stored run of bytes inside one chunk of a file, as listed by `ReadMap`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SliceRef {
    /// Offset of the slice's first byte inside the chunk.
    pub pos: u32,
    /// Length in bytes.
    pub len: u32,
    /// Slice id, or [`HOLE_SLICE`] for zeros.
    pub id: SliceId,
    /// Chunk servers that hold every block of the slice.
    pub servers: Vec<ServerId>,
}

/// A slice the client has stored and now commits to a file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NewSlice {
    pub chunk: u64,
    pub slice: SliceRef,
}

/// A chunk server as the metadata server knows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ChunkServerInfo {
    pub id: ServerId,
    /// Address clients connect to (`host:port`).
    pub addr: String,
    /// Failure domain: no two copies of a block are placed in one zone.
    pub zone: String,
    pub capacity: u64,
    pub free: u64,
    /// Whether it has heartbeated recently.
    pub alive: bool,
    /// Being emptied (`cairn chunk drain`): gets no new copies, and its copies are moved.
    pub draining: bool,
    /// Slices the metadata records on it, and their bytes, at the last repair scan.
    pub slices: u64,
    pub bytes: u64,
}

/// Volume-wide constants a client needs, sent at session start.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub uuid: String,
    /// Bytes per chunk: slices never cross a chunk boundary.
    pub chunk_size: u64,
    /// Largest block a slice is cut into.
    pub block_size: u64,
    /// Copies of each block to store.
    pub replication: u32,
    /// zstd level blocks are compressed with; 0 stores them uncompressed.
    pub compression: i32,
    /// Whether clients encrypt blocks under the volume key before storing them.
    pub encrypted: bool,
}

/// Filesystem-wide usage for `statfs`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct FsStats {
    pub capacity: u64,
    pub free: u64,
    pub files: u64,
    /// Slices with fewer live copies than the replication factor, at the last repair scan.
    pub short_slices: u64,
    /// Slices none of whose holders is alive, at the last repair scan.
    pub lost_slices: u64,
    /// Slices re-replicated since the metadata server started.
    pub repaired_slices: u64,
    /// Slices moved to even out servers (rebalancing and draining) since it started.
    pub moved_slices: u64,
    /// Corrupt copies reported by chunk servers (scrub or reads) since it started.
    pub bad_copies: u64,
    /// Orphaned slices (no file references them on that server) deleted since it started.
    pub orphans_deleted: u64,
    /// Repair scans finished since it started: the per-server counts in `ChunkServerInfo`
    /// are as of the last one.
    pub scans: u64,
}

/// What `cairn gc` found and deleted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct GcReport {
    /// Files removed moments ago (nothing had them open) whose data is not queued yet: an
    /// inode is freed a few seconds after its last link goes.
    pub removed: u64,
    /// Slices of removed or overwritten data whose blocks are still queued for deletion.
    pub queued: u64,
    /// How long a copy no file references is kept before it is deleted (`orphan_grace_secs`).
    pub grace_secs: u64,
    /// One entry per live chunk server.
    pub servers: Vec<GcServer>,
}

/// One chunk server's part of a [`GcReport`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct GcServer {
    pub id: ServerId,
    /// Slices with blocks on the server.
    pub slices: u64,
    /// Slices no file references on this server that are still within the grace period.
    pub waiting: u64,
    /// The longest any of those has been seen unreferenced, in seconds.
    pub oldest_secs: u64,
    /// Unreferenced slices whose blocks this run deleted.
    pub deleted: u64,
    /// Why the server could not be listed or cleaned, if so.
    pub error: Option<String>,
}

/// What `cairn fsck` found.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct FsckReport {
    pub inodes: u64,
    pub dentries: u64,
    pub slices: u64,
    /// One line per inconsistency; empty when the namespace is consistent.
    pub problems: Vec<String>,
}
