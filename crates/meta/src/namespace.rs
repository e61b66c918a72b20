//! Namespace operations. Each mutation checks what it needs on the writer connection, then
//! applies all its writes as one transaction (a [`Batch`]), so it is atomic.

use crate::MetaService;
use crate::acl::{self, Acl};
use crate::error::{MetaError, Result};
use crate::store::{Batch, Child, WriteGuard, reads};
use cairn_proto::meta::{Caller, RenameMode, SetAttrs, XattrMode};
use cairn_proto::*;

fn err(code: ErrorCode, msg: impl Into<String>) -> MetaError {
    MetaError::fs(code, msg)
}

pub(crate) fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(err(ErrorCode::Invalid, "invalid file name"));
    }
    if name.len() > NAME_MAX {
        return Err(err(ErrorCode::NameTooLong, format!("name of {} bytes exceeds {NAME_MAX}", name.len())));
    }
    Ok(())
}

/// Checks that `a` is a directory that still exists (not removed while a client held it).
fn live_dir(a: &Attr) -> Result<()> {
    if a.kind != FileKind::Dir {
        return Err(err(ErrorCode::NotDir, format!("inode {} is not a directory", a.ino)));
    }
    if a.nlink == 0 {
        return Err(err(ErrorCode::NotFound, "directory was removed"));
    }
    Ok(())
}

/// A directory and what `name` in it is, checked to be a live directory.
async fn dir_entry(w: &mut WriteGuard<'_>, parent: Ino, name: &[u8]) -> Result<(Attr, Option<Child>)> {
    let (p, child) = reads::entry(w.conn(), parent, name).await?;
    live_dir(&p)?;
    Ok((p, child))
}

/// EOPNOTSUPP for an xattr Cairn does not store (see [`xattr_unsupported`]).
fn supported(name: &[u8]) -> Result<()> {
    match xattr_unsupported(name) {
        false => Ok(()),
        true => Err(err(ErrorCode::NotSupported, format!("{} is not supported", String::from_utf8_lossy(name)))),
    }
}

/// EPERM if `flags` make the inode immutable or append-only: it cannot be unlinked, renamed,
/// linked or changed, and a directory cannot lose entries.
fn unlocked(flags: u32) -> Result<()> {
    match flags & inode_flags::LOCKED {
        0 => Ok(()),
        _ => Err(err(ErrorCode::Perm, "the inode is immutable or append-only")),
    }
}

/// EPERM if `flags` make a directory immutable: nothing can be added to it.
fn not_immutable(flags: u32) -> Result<()> {
    match flags & inode_flags::IMMUTABLE {
        0 => Ok(()),
        _ => Err(err(ErrorCode::Perm, "the directory is immutable")),
    }
}

/// The directories a namespace change touched, with the attributes it left them with: the
/// client answers the kernel's getattr of them (which follows every create, unlink and rename
/// under `default_permissions`) without another round trip.
#[derive(Default)]
pub(crate) struct TouchedDirs(pub(crate) Vec<Attr>);

impl TouchedDirs {
    /// Adds to `b` the update of `dir`'s link count and times, and records the result.
    fn touch(&mut self, b: &mut Batch, dir: &Attr, nlink_delta: i64, now: Timestamp) {
        b.touch_dir(dir.ino, nlink_delta, now);
        let mut a = dir.clone();
        a.nlink = (i64::from(a.nlink) + nlink_delta) as u32;
        a.mtime = now;
        a.ctime = now;
        self.0.push(a);
    }
}

/// Counts a directory's link for a parent's `nlink`.
fn dir_links(kind: FileKind) -> i64 {
    i64::from(kind == FileKind::Dir)
}

impl MetaService {
    pub(crate) async fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(err(ErrorCode::NameTooLong, "name too long"));
        }
        // "." and ".." come from the kernel's file-handle support (open_by_handle_at after the
        // inode left its cache): an inode with no link left is gone (ESTALE to the caller).
        let ino = match name {
            b"." => parent,
            b".." => reads::parent_of(&self.store.readers, parent)
                .await?
                .ok_or_else(|| err(ErrorCode::NotFound, "no such inode"))?,
            _ => {
                return reads::lookup(&self.store.readers, parent, name)
                    .await?
                    .ok_or_else(|| err(ErrorCode::NotFound, "no such entry"));
            }
        };
        match reads::get_attr(&self.store.readers, ino).await? {
            a if a.nlink == 0 => Err(err(ErrorCode::NotFound, "inode has no link left")),
            a => Ok(a),
        }
    }

    pub(crate) async fn getattr(&self, ino: Ino) -> Result<Attr> {
        reads::get_attr(&self.store.readers, ino).await
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn make_node(
        &self,
        conn: usize,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
        masked_perm: u32,
        full_perm: u32,
        rdev: u32,
        target: Option<Vec<u8>>,
        caller: &Caller,
        open: bool,
        deferred: Option<(Timestamp, Ino)>,
    ) -> Result<(Attr, TouchedDirs)> {
        check_name(name)?;
        if let Some(t) = &target
            && (t.is_empty() || t.len() > SYMLINK_MAX)
        {
            return Err(err(ErrorCode::NameTooLong, "symlink target length out of range"));
        }
        let mut w = self.store.write().await?;
        let p = w.attr(parent).await?;
        live_dir(&p)?;
        not_immutable(p.flags)?;
        // A change deferred under the solo lease was made, and answered, at `at` (see `solo`).
        let now = deferred.map_or_else(Timestamp::now, |(at, _)| at);
        // A default ACL on the directory replaces the umask (`masked_perm`): the new inode gets
        // it as its access ACL, limited by the requested mode; a new directory inherits it too.
        let default_acl = match kind {
            FileKind::Symlink => None,
            _ if !p.has_xattrs => None,
            _ => reads::xattr(w.conn(), parent, acl::DEFAULT).await?,
        };
        let mut perm = masked_perm & 0o7777;
        let mut access_acl = None;
        if let Some(default) = &default_acl {
            let (inherited, bits) = Acl::parse(default)?.inherit(full_perm & 0o7777);
            perm = bits;
            access_acl = (!inherited.is_mode_only()).then(|| inherited.encode());
        }
        let mut gid = caller.gid;
        if p.perm & libc::S_ISGID != 0 {
            gid = p.gid;
            if kind == FileKind::Dir {
                perm |= libc::S_ISGID;
            }
        }
        if kind == FileKind::Symlink {
            perm = 0o777;
        }
        let nlink = if kind == FileKind::Dir { 2 } else { 1 };
        let size = target.as_ref().map_or(0, |t| t.len() as u64);
        let mut b = Batch::default();
        let mut dirs = TouchedDirs::default();
        dirs.touch(&mut b, &p, dir_links(kind), now);
        b.insert_inode(deferred.map(|(_, ino)| ino), kind, perm, nlink, caller.uid, gid, rdev, parent, target, now);
        b.insert_dentry_for_new_inode(parent, name, kind);
        if let Some(value) = &access_acl {
            b.set_xattr_of_new_entry(parent, name, acl::ACCESS, value);
        }
        let default_acl = default_acl.filter(|_| kind == FileKind::Dir);
        if let Some(value) = &default_acl {
            b.set_xattr_of_new_entry(parent, name, acl::DEFAULT, value);
        }
        let ino = w.apply(b).await?.ino()?;
        if open {
            self.opens.open(conn, ino);
            if kind == FileKind::File {
                // Nobody else knows the file yet: its creator holds the first write lease.
                self.leases.set_writer(ino, conn, FIRST_LEASE);
            }
        }
        let attr = Attr {
            ino,
            kind,
            perm,
            nlink,
            uid: caller.uid,
            gid,
            rdev,
            size,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            has_xattrs: access_acl.is_some() || default_acl.is_some(),
            stored: 0,
            flags: 0,
        };
        Ok((attr, dirs))
    }

    pub(crate) async fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Result<(Attr, TouchedDirs)> {
        check_name(new_name)?;
        let mut w = self.store.write().await?;
        let mut a = w.attr(ino).await?;
        if a.kind == FileKind::Dir {
            return Err(err(ErrorCode::Perm, "cannot hard-link a directory"));
        }
        if a.nlink == 0 {
            return Err(err(ErrorCode::NotFound, "file was removed"));
        }
        unlocked(a.flags)?;
        let (p, existing) = dir_entry(&mut w, new_parent, new_name).await?;
        if existing.is_some() {
            return Err(err(ErrorCode::Exists, "entry exists"));
        }
        not_immutable(p.flags)?;
        let now = Timestamp::now();
        let mut b = Batch::default();
        let mut dirs = TouchedDirs::default();
        b.insert_dentry(new_parent, new_name, ino, a.kind);
        dirs.touch(&mut b, &p, 0, now);
        b.add_link(ino, now);
        w.apply(b).await?;
        a.nlink += 1;
        a.ctime = now;
        Ok((a, dirs))
    }

    /// Schedules the freeing of inodes a batch left without links, unless still open.
    fn unlinked(&self, inos: Vec<Ino>) {
        for ino in inos {
            if self.opens.unlinked(ino) {
                self.defer_purge(ino);
            }
        }
    }

    /// Removes a non-directory name; returns the directories touched and the unlinked inode.
    pub(crate) async fn unlink(&self, parent: Ino, name: &[u8], now: Timestamp) -> Result<(TouchedDirs, Vec<Ino>)> {
        let mut w = self.store.write().await?;
        let (p, child) = dir_entry(&mut w, parent, name).await?;
        let Some(child) = child else {
            return Err(err(ErrorCode::NotFound, "no such entry"));
        };
        if child.kind == FileKind::Dir {
            return Err(err(ErrorCode::IsDir, "is a directory"));
        }
        unlocked(p.flags)?;
        unlocked(child.flags)?;
        let mut b = Batch::default();
        let mut dirs = TouchedDirs::default();
        b.delete_dentry(parent, name);
        dirs.touch(&mut b, &p, 0, now);
        b.drop_link(child.ino, false, now);
        let done = w.apply(b).await?;
        self.unlinked(done.unlinked());
        Ok((dirs, vec![child.ino]))
    }

    /// Removes an empty directory; returns the directories touched and the removed one.
    pub(crate) async fn rmdir(&self, parent: Ino, name: &[u8], now: Timestamp) -> Result<(TouchedDirs, Vec<Ino>)> {
        if name == b"." {
            return Err(err(ErrorCode::Invalid, "cannot remove '.'"));
        }
        if name == b".." {
            return Err(err(ErrorCode::NotEmpty, "cannot remove '..'"));
        }
        let mut w = self.store.write().await?;
        let (p, child) = dir_entry(&mut w, parent, name).await?;
        let Some(child) = child else {
            return Err(err(ErrorCode::NotFound, "no such entry"));
        };
        if child.kind != FileKind::Dir {
            return Err(err(ErrorCode::NotDir, "not a directory"));
        }
        unlocked(p.flags)?;
        unlocked(child.flags)?;
        if !child.empty {
            return Err(err(ErrorCode::NotEmpty, "directory not empty"));
        }
        let mut b = Batch::default();
        let mut dirs = TouchedDirs::default();
        b.delete_dentry(parent, name);
        dirs.touch(&mut b, &p, -1, now);
        b.drop_link(child.ino, true, now);
        let done = w.apply(b).await?;
        self.unlinked(done.unlinked());
        Ok((dirs, vec![child.ino]))
    }

    /// True if `dir` is `ancestor` or lies below it.
    async fn is_within(w: &mut WriteGuard<'_>, mut dir: Ino, ancestor: Ino) -> Result<bool> {
        for _ in 0..100_000 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            match reads::parent_of(w.conn(), dir).await? {
                Some(p) => dir = p,
                None => return Ok(false),
            }
        }
        Err(err(ErrorCode::Loop, "directory tree too deep"))
    }

    pub(crate) async fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        mode: RenameMode,
        now: Timestamp,
    ) -> Result<(TouchedDirs, Vec<Ino>)> {
        check_name(new_name)?;
        let mut w = self.store.write().await?;
        let (p, src) = dir_entry(&mut w, parent, name).await?;
        let Some(src) = src else {
            return Err(err(ErrorCode::NotFound, "no such entry"));
        };
        let (new_p, dst) = dir_entry(&mut w, new_parent, new_name).await?;
        unlocked(p.flags)?;
        unlocked(src.flags)?;
        not_immutable(new_p.flags)?;
        if let Some(d) = &dst {
            unlocked(d.flags)?;
        }
        // Within one directory nothing can move into its own subtree.
        if src.kind == FileKind::Dir && parent != new_parent && Self::is_within(&mut w, new_parent, src.ino).await? {
            return Err(err(ErrorCode::Invalid, "cannot move a directory into itself"));
        }
        let mut b = Batch::default();
        let mut dirs = TouchedDirs::default();
        let unnamed: Vec<Ino> = std::iter::once(src.ino).chain(dst.as_ref().map(|d| d.ino)).collect();
        let whiteout = match &mode {
            RenameMode::Whiteout { caller, .. } => Some(caller.clone()),
            _ => None,
        };
        match (mode, dst) {
            (RenameMode::Exchange, None) => return Err(err(ErrorCode::NotFound, "exchange target does not exist")),
            (RenameMode::NoReplace | RenameMode::Whiteout { no_replace: true, .. }, Some(_)) => {
                return Err(err(ErrorCode::Exists, "target exists"));
            }
            (_, Some(d)) if d.ino == src.ino => return Ok((dirs, Vec::new())),
            (RenameMode::Exchange, Some(dst)) => {
                if dst.kind == FileKind::Dir && parent != new_parent && Self::is_within(&mut w, parent, dst.ino).await?
                {
                    return Err(err(ErrorCode::Invalid, "cannot move a directory into itself"));
                }
                b.retarget_dentry(parent, name, dst.ino, dst.kind);
                b.retarget_dentry(new_parent, new_name, src.ino, src.kind);
                if parent != new_parent {
                    let delta = dir_links(dst.kind) - dir_links(src.kind);
                    dirs.touch(&mut b, &p, delta, now);
                    dirs.touch(&mut b, &new_p, -delta, now);
                    if src.kind == FileKind::Dir {
                        b.set_parent(src.ino, new_parent);
                    }
                    if dst.kind == FileKind::Dir {
                        b.set_parent(dst.ino, parent);
                    }
                } else {
                    dirs.touch(&mut b, &p, 0, now);
                }
                b.touch_ctime(src.ino, now);
                b.touch_ctime(dst.ino, now);
            }
            (_, existing) => {
                let mut new_parent_links = 0;
                if let Some(dst) = existing {
                    match (src.kind == FileKind::Dir, dst.kind == FileKind::Dir) {
                        (true, false) => return Err(err(ErrorCode::NotDir, "target is not a directory")),
                        (false, true) => return Err(err(ErrorCode::IsDir, "target is a directory")),
                        (true, true) if !dst.empty => {
                            return Err(err(ErrorCode::NotEmpty, "target directory not empty"));
                        }
                        _ => {}
                    }
                    b.delete_dentry(new_parent, new_name);
                    new_parent_links -= dir_links(dst.kind);
                    b.drop_link(dst.ino, dst.kind == FileKind::Dir, now);
                }
                b.move_dentry(parent, name, new_parent, new_name);
                if parent != new_parent {
                    dirs.touch(&mut b, &p, -dir_links(src.kind), now);
                    new_parent_links += dir_links(src.kind);
                    if src.kind == FileKind::Dir {
                        b.set_parent(src.ino, new_parent);
                    }
                }
                dirs.touch(&mut b, &new_p, new_parent_links, now);
                b.touch_ctime(src.ino, now);
                if let Some(caller) = whiteout {
                    b.insert_inode(None, FileKind::CharDev, 0, 1, caller.uid, caller.gid, 0, parent, None, now);
                    b.insert_dentry_for_new_inode(parent, name, FileKind::CharDev);
                }
            }
        }
        let done = w.apply(b).await?;
        self.unlinked(done.unlinked());
        Ok((dirs, unnamed))
    }

    pub(crate) async fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        reads::symlink_target(&self.store.readers, ino).await?.ok_or_else(|| err(ErrorCode::Invalid, "not a symlink"))
    }

    pub(crate) async fn readdir(&self, ino: Ino, after: u64, limit: u32, plus: bool) -> Result<Vec<DirEntry>> {
        let a = reads::get_attr(&self.store.readers, ino).await?;
        if a.kind != FileKind::Dir {
            return Err(err(ErrorCode::NotDir, "not a directory"));
        }
        reads::dir_entries(&self.store.readers, ino, after, limit.clamp(1, 4096) as i64, plus).await
    }

    /// Registers a handle; returns the attributes and, for a file with data, its first
    /// chunk's map (see `MetaResponse::Opened`).
    pub(crate) async fn open(&self, conn: usize, ino: Ino) -> Result<(Attr, Option<Vec<SliceRef>>)> {
        // Registered before reading: a purge checks the handles under the writer lock, so once
        // this read sees the file linked, no purge can free it while it is open.
        self.opens.open(conn, ino);
        let read = match reads::open_view(&self.store.readers, ino).await {
            // Unlinked already: a purge may have checked the handles before this registration,
            // so look again after any purge in progress, under the writer lock.
            Ok((a, _)) if a.nlink == 0 => match self.store.write().await {
                Ok(mut w) => reads::open_view(w.conn(), ino).await,
                Err(e) => Err(e),
            },
            other => other,
        };
        if read.is_err() {
            self.close(conn, ino);
        }
        read
    }

    /// Drops a handle; the last one of a file without links frees it. No SQL: which inodes
    /// are such orphans is known in memory ([`crate::opens::Opens`]).
    pub(crate) fn close(&self, conn: usize, ino: Ino) {
        if self.opens.close(conn, ino) {
            self.defer_purge(ino);
        }
        // A client's last close of a file ends its write lease (it flushed before closing).
        if !self.opens.holds(conn, ino) {
            self.leases.drop_writer(ino, conn);
        }
    }

    /// Drops a disconnected client's handles and frees files only it kept alive.
    pub(crate) fn connection_lost(&self, conn: usize) {
        for ino in self.opens.drop_conn(conn) {
            self.defer_purge(ino);
        }
    }

    /// `MetaRequest::SetAttr`. With `fence`, a size change also ends the file's write lease
    /// epoch (the requester does not hold it), so a writer that lost track of its lease can
    /// no longer commit data from before the truncation over it.
    pub(crate) async fn setattr(&self, ino: Ino, set: &SetAttrs, fence: bool) -> Result<Attr> {
        let mut w = self.store.write().await?;
        let mut a = w.attr(ino).await?;
        // A locked inode keeps its attributes; an append-only one may still be touched to now.
        let explicit = |t: Option<TimeSet>| matches!(t, Some(TimeSet::At(_)));
        let touched = set.atime.is_some() || set.mtime.is_some();
        let changes = set.perm.is_some() || set.uid.is_some() || set.gid.is_some() || set.size.is_some();
        if changes || explicit(set.atime) || explicit(set.mtime) {
            unlocked(a.flags)?;
        } else if touched && a.flags & inode_flags::IMMUTABLE != 0 {
            return Err(err(ErrorCode::Perm, "the inode is immutable"));
        }
        if let Some(flags) = set.flags {
            if flags & !inode_flags::SUPPORTED != 0 {
                return Err(err(ErrorCode::NotSupported, format!("unsupported inode flags {flags:#x}")));
            }
            a.flags = flags;
        }
        let now = Timestamp::now();
        let mut b = Batch::default();
        if fence && set.size.is_some() {
            b.bump_lease(ino, self.lease_floor);
        }
        if let Some(perm) = set.perm {
            a.perm = perm & 0o7777;
            // The access ACL and the permission bits are one thing: chmod rewrites both.
            if a.has_xattrs
                && let Some(value) = reads::xattr(w.conn(), ino, acl::ACCESS).await?
            {
                let mut access = Acl::parse(&value)?;
                access.chmod(a.perm);
                b.set_xattr(ino, acl::ACCESS, &access.encode(), now);
            }
        }
        if let Some(uid) = set.uid {
            a.uid = uid;
        }
        if let Some(gid) = set.gid {
            a.gid = gid;
        }
        if let Some(size) = set.size {
            match a.kind {
                FileKind::File => {}
                FileKind::Dir => return Err(err(ErrorCode::IsDir, "cannot truncate a directory")),
                _ => return Err(err(ErrorCode::Invalid, "cannot truncate this kind of file")),
            }
            if size > MAX_FILE_SIZE {
                return Err(err(ErrorCode::FileTooBig, "size exceeds the maximum file size"));
            }
            if size < a.size {
                self.truncate_data(&mut b, ino, a.size, size);
            }
            a.size = size;
            a.mtime = now;
        }
        if let Some(t) = set.atime {
            a.atime = t.resolve(now);
        }
        if let Some(t) = set.mtime {
            a.mtime = t.resolve(now);
        }
        a.ctime = set.ctime.unwrap_or(now);
        b.put_attr(&a);
        w.apply(b).await?;
        Ok(a)
    }

    pub(crate) async fn set_xattr(
        &self,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
        caller: &Caller,
    ) -> Result<()> {
        if name.is_empty() || name.len() > XATTR_NAME_MAX {
            return Err(err(ErrorCode::Range, "xattr name length out of range"));
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(err(ErrorCode::TooBig, "xattr value too large"));
        }
        supported(name)?;
        let mut w = self.store.write().await?;
        let mut a = w.attr(ino).await?;
        unlocked(a.flags)?;
        let exists = reads::xattr(w.conn(), ino, name).await?.is_some();
        match (mode, exists) {
            (XattrMode::Create, true) => return Err(err(ErrorCode::Exists, "xattr exists")),
            (XattrMode::Replace, false) => return Err(err(ErrorCode::NoData, "no such xattr")),
            _ => {}
        }
        let now = Timestamp::now();
        let mut b = Batch::default();
        match name {
            acl::ACCESS => {
                // The ACL sets the permission bits; one the bits express fully is not stored.
                let access = Acl::parse(value)?;
                a.perm = a.perm & !0o777 | access.mode_bits();
                if !caller.in_group_or_root(a.gid) {
                    a.perm &= !libc::S_ISGID;
                }
                a.ctime = now;
                b.put_attr(&a);
                if !access.is_mode_only() {
                    b.set_xattr(ino, name, value, now);
                } else if exists {
                    b.remove_xattr(ino, name, now);
                }
            }
            acl::DEFAULT => {
                Acl::parse(value)?;
                b.set_xattr(ino, name, value, now);
            }
            _ => b.set_xattr(ino, name, value, now),
        }
        w.apply(b).await?;
        Ok(())
    }

    pub(crate) async fn get_xattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        supported(name)?;
        match reads::xattr(&self.store.readers, ino, name).await? {
            Some(v) => Ok(v),
            None => {
                reads::get_attr(&self.store.readers, ino).await?;
                Err(err(ErrorCode::NoData, "no such xattr"))
            }
        }
    }

    pub(crate) async fn list_xattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        reads::get_attr(&self.store.readers, ino).await?;
        let mut names = reads::xattr_names(&self.store.readers, ino).await?;
        // Stored before it was refused.
        names.retain(|n| !xattr_unsupported(n));
        Ok(names)
    }

    pub(crate) async fn remove_xattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        supported(name)?;
        let mut w = self.store.write().await?;
        unlocked(w.attr(ino).await?.flags)?;
        if reads::xattr(w.conn(), ino, name).await?.is_none() {
            return Err(err(ErrorCode::NoData, "no such xattr"));
        }
        let mut b = Batch::default();
        b.remove_xattr(ino, name, Timestamp::now());
        w.apply(b).await?;
        Ok(())
    }
}
