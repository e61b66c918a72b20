//! The only module that knows fuser: kernel requests in, `cairn_client::Client` calls out.
//!
//! Each request is moved onto the tokio runtime with its reply object, so FUSE worker threads
//! are free again at once and slow network calls never block other requests.

use crate::ioctl::*;
use cairn_client::{Client, ClientError, LockCall};
use cairn_proto::meta::{Caller, FallocMode, LockKind, RenameMode, SetAttrs, XattrMode};
use cairn_proto::{Attr, DirEntry, ErrorCode, FileKind, Ino, STATS_IOCTL, TimeSet, Timestamp};
use dashmap::DashMap;
use fuser::*;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// Largest write the kernel sends in one request.
const MAX_WRITE: u32 = 1 << 20;
/// Entries fetched from the metadata server per readdir round trip.
const READDIR_BATCH: u32 = 1024;

/// The FUSE filesystem: a client plus the runtime its calls run on.
pub struct CairnFs {
    client: Arc<Client>,
    rt: tokio::runtime::Handle,
    next_fh: AtomicU64,
    /// Directory listings fetched ahead, per open directory handle.
    dirs: Arc<DashMap<u64, Mutex<DirBatch>>>,
    /// Tells the kernel to drop what it caches; set once the session is mounted.
    notifier: Arc<OnceLock<Notifier>>,
    /// POSIX ACLs enforced (`-o acl`); without them `system.posix_acl_*` is `EOPNOTSUPP`.
    acl: bool,
    /// O_DIRECT opens get [`DIRECT_OPEN`]: set at `init` if the kernel is recent enough.
    direct_opens: bool,
}

/// How O_DIRECT opens are answered: their reads and writes bypass the page cache, as asked,
/// and the kernel sends writes to one file in parallel instead of one at a time under the
/// inode lock (a database's or fio's threads writing pages of one file: 2.6 times the
/// writes per second with 4 threads here). Only where the kernel's direct writes drop the
/// range written from the page cache, which other opens of the file on this machine read
/// through (FUSE 7.39, Linux 6.6, with `FUSE_DIRECT_IO_ALLOW_MMAP`); before, they would read
/// stale pages, so O_DIRECT opens keep the kernel's own path there.
const DIRECT_OPEN: FopenFlags = FopenFlags::FOPEN_DIRECT_IO.union(FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES);

impl CairnFs {
    /// The filesystem, and the slot where the caller puts the session's notifier once mounted.
    pub fn new(client: Arc<Client>, rt: tokio::runtime::Handle, acl: bool) -> (CairnFs, Arc<OnceLock<Notifier>>) {
        let notifier = Arc::new(OnceLock::new());
        let fs = CairnFs {
            client,
            rt,
            next_fh: AtomicU64::new(1),
            dirs: Arc::new(DashMap::new()),
            notifier: notifier.clone(),
            acl,
            direct_opens: false,
        };
        (fs, notifier)
    }

    /// An ACL xattr on a mount without `acl`: `EOPNOTSUPP`, so `ls -l` stops asking after
    /// the first file and `setfacl` says ACLs are not supported.
    fn refuses(&self, name: &[u8]) -> bool {
        !self.acl && is_acl(name)
    }

    /// Whether an open with `flags` gets [`DIRECT_OPEN`].
    fn direct(&self, flags: i32) -> bool {
        self.direct_opens && flags & libc::O_DIRECT != 0
    }

    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, f: F) {
        self.rt.spawn(f);
    }
}

fn errno(e: &ClientError) -> Errno {
    Errno::from_i32(e.errno())
}

/// errno for a request on an inode the kernel looked up earlier. If the inode is gone (its last
/// link was removed after the lookup, e.g. by a rename over it), ESTALE makes the kernel redo
/// the path walk once with a fresh lookup, as it does for NFS, instead of failing the call.
fn errno_looked_up(e: &ClientError) -> Errno {
    if e.code == ErrorCode::NotFound { Errno::from_i32(libc::ESTALE) } else { errno(e) }
}

fn kind_of(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

fn to_fuse(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: match a.kind {
            FileKind::File => a.stored.min(a.size).div_ceil(512),
            _ => a.size.div_ceil(512),
        },
        atime: a.atime.to_system_time(),
        mtime: a.mtime.to_system_time(),
        ctime: a.ctime.to_system_time(),
        crtime: a.crtime.to_system_time(),
        kind: kind_of(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 1 << 20,
        flags: 0,
    }
}

/// Placeholder attributes for a negative lookup reply (only the TTL matters to the kernel).
fn negative_attr() -> Attr {
    Attr {
        ino: 0,
        kind: FileKind::File,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        size: 0,
        atime: Timestamp::default(),
        mtime: Timestamp::default(),
        ctime: Timestamp::default(),
        crtime: Timestamp::default(),
        has_xattrs: false,
        stored: 0,
        flags: 0,
    }
}

/// Makes the kernel fetch `ino`'s attributes again instead of trusting its cache. Called after
/// the reply to the request that changed them.
fn forget_attrs(notifier: &OnceLock<Notifier>, ino: INodeNo) {
    if let Some(n) = notifier.get() {
        let _ = n.inval_inode(ino, -1, 0);
    }
}

/// Makes the kernel forget what another client changed (a recall): each inode's attributes
/// and cached pages, each name's dentry, and the attributes of the directories holding them.
/// Errors (the kernel never saw the inode or name) mean there was nothing to forget.
pub fn kernel_invalidator(n: Notifier) -> cairn_client::KernelInvalidator {
    Arc::new(move |inodes: &[u64], entries: &[(u64, Vec<u8>)]| {
        for ino in inodes {
            let _ = n.inval_inode(INodeNo(*ino), 0, 0);
        }
        for (dir, name) in entries {
            let _ = n.inval_entry(INodeNo(*dir), OsStr::from_bytes(name));
            let _ = n.inval_inode(INodeNo(*dir), -1, 0);
        }
    })
}

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid(), groups: Vec::new() }
}

/// `system.posix_acl_access` and `system.posix_acl_default`.
fn is_acl(name: &[u8]) -> bool {
    name.starts_with(b"system.posix_acl_")
}

/// The caller with its supplementary groups (read from /proc; FUSE passes only uid and gid),
/// for the few decisions that depend on group membership. Root needs none.
fn caller_with_groups(req: &Request) -> Caller {
    let mut who = caller(req);
    if who.uid != 0 {
        who.groups = supplementary_groups(req.pid()).unwrap_or_default();
    }
    who
}

fn supplementary_groups(pid: u32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    Some(line.split_whitespace().filter_map(|g| g.parse().ok()).collect())
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(Timestamp::from_system_time(t)),
    }
}

fn name_bytes(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

/// Answers an xattr read: the size when asked for 0 bytes, ERANGE when the buffer is too small.
fn reply_sized(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

macro_rules! run {
    ($self:ident, $reply:ident, |$c:ident| $body:expr, |$v:ident| $ok:expr) => {{
        let $c = $self.client.clone();
        $self.spawn(async move {
            match $body.await {
                Ok($v) => $ok,
                Err(e) => $reply.error(errno(&e)),
            }
        });
    }};
}

impl Filesystem for CairnFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let _ = config.set_max_background(64);
        let mut flags = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            // The kernel may look up "." and ".." (below), so file handles stay valid after
            // the kernel drops an inode (NFS export, open_by_handle_at).
            | InitFlags::FUSE_EXPORT_SUPPORT
            // fcntl (POSIX and OFD) and flock locks come here, for the metadata server
            // to enforce across clients, instead of staying local to this kernel.
            | InitFlags::FUSE_POSIX_LOCKS
            | InitFlags::FUSE_FLOCK_LOCKS;
        // A MAP_SHARED mapping of an O_DIRECT descriptor (see `DIRECT_OPEN`) is allowed as
        // before; the kernel writes its dirty pages back before direct writes.
        if config.capabilities().contains(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP) {
            flags |= InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP;
            self.direct_opens = true;
        }
        if self.acl {
            // The kernel enforces POSIX ACLs stored as system.posix_acl_* xattrs; the
            // metadata server keeps them in step with the mode and applies the umask
            // itself, since a default ACL replaces it.
            flags |= InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK;
        }
        let _ = config.add_capabilities(flags);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name_bytes(name);
        run!(self, reply, |c| c.lookup(parent.0, &name), |e| {
            // A negative entry (inode 0) lets the kernel remember the miss for the same TTL
            // as positive entries, so create-after-lookup costs one round trip, not two.
            let attr = match e.attr {
                Some(a) => to_fuse(&a),
                None => FileAttr { ino: INodeNo(0), ..to_fuse(&negative_attr()) },
            };
            reply.entry(&e.ttl, &attr, Generation(0))
        })
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        // Answered here when cached, without the hand-off to the network thread and back.
        if let Some((attr, ttl)) = self.client.cached_stat(ino.0) {
            return reply.attr(&ttl, &to_fuse(&attr));
        }
        run!(self, reply, |c| c.stat(ino.0), |st| reply.attr(&st.1, &to_fuse(&st.0)))
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttrs {
            perm: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            ctime: ctime.map(Timestamp::from_system_time),
            flags: None,
        };
        let who = caller(req);
        run!(self, reply, |c| c.setattr(ino.0, set, who), |a| reply.attr(&c.kernel_ttl(), &to_fuse(&a)))
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        run!(self, reply, |c| c.readlink(ino.0), |t| reply.data(&t))
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let Some(kind) = FileKind::from_mode(mode) else {
            return reply.error(Errno::EINVAL);
        };
        let (name, who) = (name_bytes(name), caller(req));
        run!(self, reply, |c| c.make_node(parent.0, &name, kind, mode & 0o7777, umask, rdev, None, who, false), |a| {
            reply.entry(&c.kernel_ttl(), &to_fuse(&a), Generation(0))
        })
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let (name, who) = (name_bytes(name), caller(req));
        run!(
            self,
            reply,
            |c| c.make_node(parent.0, &name, FileKind::Dir, mode & 0o7777, umask, 0, None, who, false),
            |a| reply.entry(&c.kernel_ttl(), &to_fuse(&a), Generation(0))
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name_bytes(name);
        run!(self, reply, |c| c.unlink(parent.0, &name), |_v| reply.ok())
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name_bytes(name);
        run!(self, reply, |c| c.rmdir(parent.0, &name), |_v| reply.ok())
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let (name, who) = (name_bytes(link_name), caller(req));
        let target = target.as_os_str().as_bytes().to_vec();
        run!(
            self,
            reply,
            |c| c.make_node(parent.0, &name, FileKind::Symlink, 0o777, 0, 0, Some(target), who, false),
            |a| reply.entry(&c.kernel_ttl(), &to_fuse(&a), Generation(0))
        )
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let mode = if flags == RenameFlags::RENAME_EXCHANGE {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            RenameMode::Whiteout { no_replace, caller: caller(req) }
        } else if flags == RenameFlags::RENAME_NOREPLACE {
            RenameMode::NoReplace
        } else if flags.is_empty() {
            RenameMode::Replace
        } else {
            return reply.error(Errno::EINVAL);
        };
        let (name, newname) = (name_bytes(name), name_bytes(newname));
        run!(self, reply, |c| c.rename(parent.0, &name, newparent.0, &newname, mode), |_v| reply.ok())
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let newname = name_bytes(newname);
        run!(self, reply, |c| c.link(ino.0, newparent.0, &newname), |a| {
            reply.entry(&c.kernel_ttl(), &to_fuse(&a), Generation(0))
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let c = self.client.clone();
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        let append = flags.0 & libc::O_APPEND != 0;
        let direct = self.direct(flags.0);
        self.spawn(async move {
            match c.open(ino.0, write, append).await {
                // Appends go where the file ends on the server, which may be past where this
                // kernel thinks it ends: keep them out of the page cache.
                Ok(_) if append => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
                Ok(_) if direct => reply.opened(FileHandle(fh), DIRECT_OPEN),
                // Recalls invalidate the kernel's pages of a file another client changes, and
                // the client tells when they may be stale for another reason.
                Ok((_, true)) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
                Ok((_, false)) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno_looked_up(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Counted from here, before a recall handled meanwhile on the runtime could miss it.
        let (c, reading) = (self.client.clone(), self.client.reading(ino.0));
        self.spawn(async move {
            let _reading = reading;
            match c.read(ino.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        let append = flags.0 & libc::O_APPEND != 0;
        run!(self, reply, |c| c.write(ino.0, offset, data, append), |w| reply.written(w.1))
    }

    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        // Every close(2) comes here with the closing process as lock owner: its byte-range
        // locks on the file go. Writes buffered under the write lease are committed after
        // the last close, in the background (see `Client::close_flush`).
        if self.client.close_is_quiet(ino.0, lock_owner.0) {
            return reply.ok();
        }
        run!(
            self,
            reply,
            |c| async move {
                let flushed = c.close_flush(ino.0).await;
                flushed.and(c.locks_flushed(ino.0, lock_owner.0).await)
            },
            |_v| reply.ok()
        )
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The open file description is gone: so are its OFD and flock locks (owned by the
        // handle; see `lock_owner_for`).
        let flock_owner = lock_owner.map(|o| o.0);
        run!(
            self,
            reply,
            |c| async move {
                let released = c.release(ino.0).await;
                released.and(c.locks_released(ino.0, fh.0, flock_owner).await)
            },
            |_v| reply.ok()
        )
    }

    fn getlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let Some(kind) = lock_kind(typ).filter(|k| *k != LockKind::Unlock) else {
            return reply.error(Errno::EINVAL);
        };
        let owner = lock_owner_for(lock_api(req.pid()), fh, lock_owner);
        run!(self, reply, |c| c.get_lock(ino.0, owner, start, end, kind), |l| match l {
            // The holder's pid means something only on its own machine; the kernel shows it
            // if a process with that number exists in this mount's namespace, else 0.
            Some(l) => reply.locked(l.start, l.end, lock_type(l.kind), l.pid),
            None => reply.locked(start, end, libc::F_UNLCK, pid),
        })
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let Some(kind) = lock_kind(typ) else {
            return reply.error(Errno::EINVAL);
        };
        // The requesting thread (not the lock's process id) is blocked in the system call.
        let thread = req.pid();
        let api = lock_api(thread);
        let call = LockCall {
            ino: ino.0,
            fh: fh.0,
            owner: lock_owner_for(api, fh, lock_owner),
            start,
            end,
            kind,
            pid,
            flock: api == LockApi::Flock,
            sleep,
        };
        run!(self, reply, |c| c.set_lock(call, move || signal_pending(thread)), |_v| reply.ok())
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        run!(self, reply, |c| c.flush(ino.0, true), |_v| reply.ok())
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.insert(fh, Mutex::new(DirBatch::default()));
        // The kernel caches listings (`git status`, `find` and `ls` list the same directories
        // again and again); it may reuse one while the directory's read lease holds.
        let flags = match self.client.open_dir(ino.0) {
            true => FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            false => FopenFlags::FOPEN_CACHE_DIR,
        };
        reply.opened(FileHandle(fh), flags);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let (client, dirs) = (self.client.clone(), self.dirs.clone());
        self.spawn(async move {
            if offset < 1 && reply.add(ino, 1, FileType::Directory, ".") {
                return reply.ok();
            }
            if offset < 2 && reply.add(ino, 2, FileType::Directory, "..") {
                return reply.ok();
            }
            match next_entries(&client, &dirs, ino.0, fh.0, offset, false).await {
                Ok((entries, _)) => {
                    for e in entries {
                        if reply.add(INodeNo(e.ino), e.cookie + 2, kind_of(e.kind), OsStr::from_bytes(&e.name)) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let (client, dirs) = (self.client.clone(), self.dirs.clone());
        self.spawn(async move {
            let ttl = client.kernel_ttl();
            if offset < 2 {
                let me = match client.getattr(ino.0).await {
                    Ok(a) => to_fuse(&a),
                    Err(e) => return reply.error(errno(&e)),
                };
                if offset < 1 && reply.add(ino, 1, ".", &ttl, &me, Generation(0)) {
                    return reply.ok();
                }
                if reply.add(ino, 2, "..", &ttl, &me, Generation(0)) {
                    return reply.ok();
                }
            }
            match next_entries(&client, &dirs, ino.0, fh.0, offset, true).await {
                Ok((entries, ttl)) => {
                    for e in entries {
                        let Some(a) = &e.attr else { continue };
                        let name = OsStr::from_bytes(&e.name);
                        if reply.add(INodeNo(e.ino), e.cookie + 2, name, &ttl, &to_fuse(a), Generation(0)) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.dirs.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        run!(self, reply, |c| c.sync_metadata(), |_v| reply.ok())
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        const BSIZE: u64 = 4096;
        run!(self, reply, |c| c.statfs(), |s| reply.statfs(
            s.capacity / BSIZE,
            s.free / BSIZE,
            s.free / BSIZE,
            s.files + (1 << 30),
            1 << 30,
            BSIZE as u32,
            cairn_proto::NAME_MAX as u32,
            BSIZE as u32
        ))
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let mode = match flags {
            0 => XattrMode::Any,
            libc::XATTR_CREATE => XattrMode::Create,
            libc::XATTR_REPLACE => XattrMode::Replace,
            _ => return reply.error(Errno::EINVAL),
        };
        let (name, value) = (name_bytes(name), value.to_vec());
        if self.refuses(&name) {
            return reply.error(Errno::EOPNOTSUPP);
        }
        // Setting an access ACL may clear setgid, depending on the caller's groups.
        let who = if is_acl(&name) { caller_with_groups(req) } else { caller(req) };
        run!(self, reply, |c| c.set_xattr(ino.0, &name, &value, mode, who), |_v| reply.ok())
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name_bytes(name);
        if self.refuses(&name) {
            return reply.error(Errno::EOPNOTSUPP);
        }
        // Misses known locally (ls -l asks every file for security.selinux) are answered on
        // the FUSE thread: no task, no round trip.
        if let Some(e) = self.client.known_xattr_miss(ino.0, &name) {
            return reply.error(errno(&e));
        }
        run!(self, reply, |c| c.get_xattr(ino.0, &name), |v| reply_sized(reply, size, &v))
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let acl = self.acl;
        run!(self, reply, |c| c.list_xattr(ino.0), |names| {
            let mut buf = Vec::new();
            // ACLs set through an `acl` mount are not this mount's to copy (cp -a, tar).
            for n in names.into_iter().filter(|n| acl || !is_acl(n)) {
                buf.extend_from_slice(&n);
                buf.push(0);
            }
            reply_sized(reply, size, &buf)
        })
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name_bytes(name);
        if self.refuses(&name) {
            return reply.error(Errno::EOPNOTSUPP);
        }
        run!(self, reply, |c| c.remove_xattr(ino.0, &name), |_v| reply.ok())
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission bits are checked by the kernel (default_permissions); this only confirms
        // the inode still exists.
        run!(self, reply, |c| c.getattr(ino.0), |_a| reply.ok())
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (name, who) = (name_bytes(name), caller(req));
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let opened = if self.direct(flags) { DIRECT_OPEN } else { FopenFlags::empty() };
        run!(
            self,
            reply,
            |c| c.make_node(parent.0, &name, FileKind::File, mode & 0o7777, umask, 0, None, who, true),
            |a| reply.created(&c.kernel_ttl(), &to_fuse(&a), Generation(0), FileHandle(fh), opened)
        )
    }

    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        match cmd {
            // xfstests' godown, ext4's EXT4_IOC_SHUTDOWN: root only. The kernel does not pass
            // the flag (the ioctl is declared _IOR), so every shutdown is the same: fail
            // everything from now on, commit nothing more.
            GOINGDOWN if req.uid() != 0 => reply.error(Errno::EPERM),
            GOINGDOWN => {
                self.client.shut_down();
                reply.ioctl(0, &vec![0; out_size as usize]);
            }
            // chattr and lsattr (the kernel turns FS_IOC_{GET,SET}FLAGS and
            // FS_IOC_FS{GET,SET}XATTR into these, with 4 or 28 bytes both ways).
            FS_IOC_GETFLAGS | FS_IOC_FSGETXATTR => {
                let xattr = cmd == FS_IOC_FSGETXATTR;
                run!(self, reply, |c| c.getattr(ino.0), |a| reply.ioctl(0, &flags_out(a.flags, xattr, out_size)))
            }
            FS_IOC_SETFLAGS | FS_IOC_FSSETXATTR => {
                let Some(flags) = flags_in(in_data, cmd == FS_IOC_FSSETXATTR) else {
                    return reply.error(Errno::EOPNOTSUPP);
                };
                let set = SetAttrs { flags: Some(flags), ..SetAttrs::default() };
                let (who, echo) = (caller(req), in_data.to_vec());
                // The kernel keeps the ctime it cached: make it fetch the new one.
                let notifier = self.notifier.clone();
                run!(self, reply, |c| c.setattr(ino.0, set, who), |_a| {
                    reply.ioctl(0, &echo[..echo.len().min(out_size as usize)]);
                    forget_attrs(&notifier, ino);
                })
            }
            STATS_IOCTL => {
                let mut report = self.client.stats_report().into_bytes();
                report.truncate(out_size as usize);
                reply.ioctl(0, &report)
            }
            _ => reply.error(Errno::from_i32(libc::ENOTTY)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        let mode = match mode {
            0 => FallocMode::Allocate,
            KEEP => FallocMode::KeepSize,
            m if m == libc::FALLOC_FL_PUNCH_HOLE | KEEP => FallocMode::PunchHole,
            libc::FALLOC_FL_ZERO_RANGE => FallocMode::ZeroRange { keep_size: false },
            m if m == libc::FALLOC_FL_ZERO_RANGE | KEEP => FallocMode::ZeroRange { keep_size: true },
            _ => return reply.error(Errno::from_i32(ErrorCode::NotSupported.errno())),
        };
        let who = caller_with_groups(req);
        // The kernel keeps the mode it cached, but a caller other than root may have just lost
        // setuid/setgid: make it fetch the attributes again.
        let notifier = (who.uid != 0).then(|| self.notifier.clone());
        run!(self, reply, |c| c.fallocate(ino.0, mode, offset, length, who), |_a| {
            reply.ok();
            if let Some(n) = &notifier {
                forget_attrs(n, ino);
            }
        })
    }
}

fn lock_kind(typ: i32) -> Option<LockKind> {
    match typ {
        libc::F_RDLCK => Some(LockKind::Read),
        libc::F_WRLCK => Some(LockKind::Write),
        libc::F_UNLCK => Some(LockKind::Unlock),
        _ => None,
    }
}

fn lock_type(kind: LockKind) -> i32 {
    match kind {
        LockKind::Read => libc::F_RDLCK,
        LockKind::Write => libc::F_WRLCK,
        LockKind::Unlock => libc::F_UNLCK,
    }
}

/// Which lock API a thread blocked in a lock request is calling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LockApi {
    /// Classic fcntl byte-range locks, owned by the process.
    Posix,
    /// fcntl `F_OFD_*` byte-range locks, owned by the open file description.
    Ofd,
    /// flock(2), owned by the open file description, in a namespace of its own.
    Flock,
}

/// The lock API `thread` is in, read from /proc. The kernel flags flock requests
/// (`FUSE_LK_FLOCK`), but fuser 0.18 does not pass the flag on, and tells OFD locks from
/// POSIX ones only by the owner it names; the thread is blocked in the system call while we
/// answer, so its number and arguments tell. Reading them needs ptrace rights over the
/// caller (the mount runs as root); without them every lock is taken as a POSIX one under
/// the kernel's owner, as NFS does.
fn lock_api(thread: u32) -> LockApi {
    std::fs::read_to_string(format!("/proc/{thread}/syscall")).map_or(LockApi::Posix, |text| lock_api_of(&text))
}

/// [`lock_api`] from a /proc/TID/syscall line: the call's number, then its arguments in hex.
fn lock_api_of(syscall: &str) -> LockApi {
    let mut fields = syscall.split_whitespace();
    let number = fields.next().and_then(|n| n.parse::<i64>().ok());
    let cmd = fields.nth(1).and_then(|a| i64::from_str_radix(a.trim_start_matches("0x"), 16).ok());
    let ofd = [libc::F_OFD_GETLK, libc::F_OFD_SETLK, libc::F_OFD_SETLKW].map(i64::from);
    match number {
        Some(libc::SYS_flock) => LockApi::Flock,
        Some(libc::SYS_fcntl) if cmd.is_some_and(|c| ofd.contains(&c)) => LockApi::Ofd,
        _ => LockApi::Posix,
    }
}

/// The owner the metadata server is told. The kernel names a POSIX lock's owner by the
/// process's file table and an OFD or flock lock's by the open file description's address;
/// that address can come back for a new open before the RELEASE of the old one is handled,
/// which would then drop the new one's locks. This mount's handle number never comes back.
fn lock_owner_for(api: LockApi, fh: FileHandle, kernel: LockOwner) -> u64 {
    match api {
        LockApi::Posix => kernel.0,
        LockApi::Ofd | LockApi::Flock => cairn_client::open_lock_owner(fh.0),
    }
}

/// Whether `thread` will take a signal when it returns to user space (or is gone), so a
/// blocked lock request should end with EINTR. fuser 0.18 answers the kernel's
/// `FUSE_INTERRUPT` with ENOSYS, so the signal is looked up in /proc instead: pending for
/// the thread or its process, and neither blocked nor ignored (SIGKILL always counts).
fn signal_pending(thread: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{thread}/status")) else { return true };
    let mask = |name: &str| {
        let v = status.lines().find_map(|l| l.strip_prefix(name));
        v.and_then(|v| u64::from_str_radix(v.trim(), 16).ok()).unwrap_or(0)
    };
    if status.lines().any(|l| l.starts_with("State:") && (l.contains("zombie") || l.contains("dead"))) {
        return true;
    }
    let pending = mask("SigPnd:") | mask("ShdPnd:");
    let kill = 1u64 << (libc::SIGKILL - 1);
    pending & kill != 0 || pending & !mask("SigBlk:") & !mask("SigIgn:") != 0
}

/// A batch of entries fetched ahead for one open directory handle.
#[derive(Default)]
struct DirBatch {
    /// The cookie the batch was fetched after.
    after: u64,
    plus: bool,
    /// True if the batch reached the end of the directory.
    complete: bool,
    /// Set when the batch is the whole directory from the client's listing: its cookies
    /// mean nothing to the server, so every continuation is served from it, and the kernel
    /// may keep its entries only until then.
    listed_until: Option<Instant>,
    entries: Vec<DirEntry>,
    /// The next page, fetched while the kernel consumes this one.
    ahead: Option<Ahead>,
}

/// A directory page fetched ahead: the client's epoch before it was asked for (its entries
/// are used only if none changed since), the cookie it continues after, and the fetch.
struct Ahead {
    epoch: u64,
    after: u64,
    fetch: tokio::task::JoinHandle<Result<Vec<DirEntry>, ClientError>>,
}

impl Drop for DirBatch {
    fn drop(&mut self) {
        if let Some(a) = &self.ahead {
            a.fetch.abort();
        }
    }
}

impl DirBatch {
    /// How long the kernel may keep entries of this batch, given the client's `kernel` TTL.
    fn ttl(&self, kernel: Duration) -> Duration {
        self.listed_until.map_or(kernel, |until| kernel.min(until.saturating_duration_since(Instant::now())))
    }
}

/// Entries of directory `ino` after readdir offset `offset`, served from the handle's
/// prefetched batch when the kernel continues where the previous reply ended, and how long
/// the kernel may keep them. The page after a batch is fetched while the kernel consumes
/// it, so a long listing waits for the server once, not once per page.
async fn next_entries(
    client: &Arc<Client>,
    dirs: &DashMap<u64, Mutex<DirBatch>>,
    ino: Ino,
    fh: u64,
    offset: u64,
    plus: bool,
) -> Result<(Vec<DirEntry>, Duration), ClientError> {
    const PER_REPLY: usize = 256;
    let after = offset.saturating_sub(2);
    let ttl = client.kernel_ttl();
    let rest =
        |b: &DirBatch| b.entries.iter().filter(|e| e.cookie > after).take(PER_REPLY).cloned().collect::<Vec<_>>();
    // Offset 0 starts a listing (opendir or rewinddir), which must show the directory as it
    // is now: the prefetched batch only serves a listing that continues.
    let mut ahead = None;
    if offset > 0
        && let Some(cached) = dirs.get(&fh)
    {
        let mut b = cached.lock().expect("dir lock");
        if b.listed_until.is_some() {
            return Ok((rest(&b), b.ttl(ttl)));
        }
        // Entries with attributes serve a plain continuation too: the kernel asks for the
        // rest of a listing it started with READDIRPLUS (often only its end) with READDIR.
        if (b.plus || !plus) && (b.after == after || b.entries.iter().any(|e| e.cookie == after)) {
            let rest = rest(&b);
            if !rest.is_empty() || b.complete {
                return Ok((rest, ttl));
            }
            ahead = b.ahead.take().filter(|a| a.after == after);
        }
    }
    let listed = if after == 0 { client.listed_entries(ino).await } else { None };
    let batch = match listed {
        Some((entries, left)) => {
            DirBatch { after, plus, complete: true, listed_until: Some(Instant::now() + left), entries, ahead: None }
        }
        None => {
            let entries = match ahead {
                Some(a) => match a.fetch.await {
                    Ok(Ok(entries)) if client.unchanged_since(entries.iter().map(|e| e.ino), ino, a.epoch) => entries,
                    _ => client.readdir(ino, after, READDIR_BATCH, plus).await?,
                },
                None => client.readdir(ino, after, READDIR_BATCH, plus).await?,
            };
            let complete = entries.len() < READDIR_BATCH as usize;
            let ahead = entries.last().filter(|_| !complete).map(|last| {
                let (client, after, epoch) = (client.clone(), last.cookie, client.epoch());
                let fetch = tokio::spawn(async move { client.readdir(ino, after, READDIR_BATCH, plus).await });
                Ahead { epoch, after, fetch }
            });
            DirBatch { after, plus, complete, listed_until: None, entries, ahead }
        }
    };
    let reply = (rest(&batch), batch.ttl(ttl));
    if let Some(cached) = dirs.get(&fh) {
        *cached.lock().expect("dir lock") = batch;
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gettid() -> u32 {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() as u32 }
    }

    #[test]
    fn lock_calls_are_told_apart_by_their_system_call() {
        let line =
            |nr: i64, cmd: i32| format!("{nr} 0x3 0x{cmd:x} 0x7ffd2c1e4a40 0x0 0x0 0x0 0x7ffd2c1e4a18 0x7f5e1b2c3d4e");
        assert_eq!(lock_api_of(&line(libc::SYS_flock, libc::LOCK_EX)), LockApi::Flock);
        for cmd in [libc::F_OFD_SETLK, libc::F_OFD_SETLKW, libc::F_OFD_GETLK] {
            assert_eq!(lock_api_of(&line(libc::SYS_fcntl, cmd)), LockApi::Ofd);
        }
        for cmd in [libc::F_SETLK, libc::F_SETLKW, libc::F_GETLK] {
            assert_eq!(lock_api_of(&line(libc::SYS_fcntl, cmd)), LockApi::Posix);
        }
        assert_eq!(lock_api_of("running"), LockApi::Posix);
        assert_eq!(lock_api_of(""), LockApi::Posix);
    }

    #[test]
    fn a_blocked_signal_does_not_interrupt_and_a_gone_thread_does() {
        let me = gettid();
        assert!(!signal_pending(me), "nothing pending");
        assert_eq!(lock_api(me), LockApi::Posix, "this thread is reading /proc, not locking");
        // SAFETY: blocks SIGUSR2 for this test thread only, then queues it to the thread.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::pthread_kill(libc::pthread_self(), libc::SIGUSR2);
        }
        assert!(!signal_pending(me), "a blocked signal is not taken");
        let status = std::fs::read_to_string(format!("/proc/{me}/status")).unwrap();
        assert!(status.lines().any(|l| l.starts_with("SigPnd:") && l.trim_end() != "SigPnd:\t0000000000000000"));
        // `join` returns when the kernel clears the thread's id, a moment before the thread
        // has finished exiting (its /proc entry can still show it running): wait for that.
        let gone = std::thread::spawn(gettid).join().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !signal_pending(gone) {
            assert!(std::time::Instant::now() < deadline, "a thread that is gone cannot wait any more");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
