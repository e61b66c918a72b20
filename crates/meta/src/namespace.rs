//! Namespace operations: each one is a single SQL transaction, so it is atomic.

use crate::MetaService;
use crate::error::{MetaError, Result};
use crate::store::{self, Tx, delete_dentry, find_dentry, get_attr, insert_dentry, insert_inode, put_attr};
use cairn_proto::meta::{Caller, RenameMode, SetAttrs, XattrMode};
use cairn_proto::*;
use sqlx::Row;

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

async fn dir_attr(tx: &mut Tx<'_>, ino: Ino) -> Result<Attr> {
    let a = get_attr(&mut **tx, ino).await?;
    if a.kind != FileKind::Dir {
        return Err(err(ErrorCode::NotDir, format!("inode {ino} is not a directory")));
    }
    Ok(a)
}

/// Marks a live directory as changed and returns its `(perm, gid)`; fails with the right errno
/// if `ino` is missing, not a directory, or already removed.
async fn touch_parent(tx: &mut Tx<'_>, ino: Ino, nlink_delta: i64, now: Timestamp) -> Result<(u32, u32)> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "UPDATE inodes SET nlink = nlink + ?, mtime_s = ?, mtime_ns = ?, ctime_s = ?, ctime_ns = ? \
         WHERE ino = ? AND kind = ? AND nlink > 0 RETURNING perm, gid",
    )
    .bind(nlink_delta)
    .bind(now.secs)
    .bind(now.nanos as i64)
    .bind(now.secs)
    .bind(now.nanos as i64)
    .bind(ino as i64)
    .bind(FileKind::Dir.to_i64())
    .fetch_optional(&mut **tx)
    .await?;
    match row {
        Some((perm, gid)) => Ok((perm as u32, gid as u32)),
        None => {
            dir_attr(tx, ino).await?;
            Err(err(ErrorCode::NotFound, "directory was removed"))
        }
    }
}

impl MetaService {
    pub(crate) async fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(err(ErrorCode::NameTooLong, "name too long"));
        }
        match find_dentry(&self.store.readers, parent, name).await? {
            Some((ino, _)) => get_attr(&self.store.readers, ino).await,
            None => {
                get_attr(&self.store.readers, parent).await?;
                Err(err(ErrorCode::NotFound, "no such entry"))
            }
        }
    }

    pub(crate) async fn getattr(&self, ino: Ino) -> Result<Attr> {
        get_attr(&self.store.readers, ino).await
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn make_node(
        &self,
        conn: usize,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        rdev: u32,
        target: Option<Vec<u8>>,
        caller: &Caller,
        open: bool,
    ) -> Result<Attr> {
        check_name(name)?;
        if let Some(t) = &target
            && (t.is_empty() || t.len() > SYMLINK_MAX)
        {
            return Err(err(ErrorCode::NameTooLong, "symlink target length out of range"));
        }
        let mut w = self.store.write().await?;
        let mut tx = w.begin().await?;
        // Few statements per transaction: each one is a round trip to SQLite's worker thread.
        let now = Timestamp::now();
        let (parent_perm, parent_gid) =
            touch_parent(&mut tx, parent, if kind == FileKind::Dir { 1 } else { 0 }, now).await?;
        let mut perm = perm & 0o7777;
        let mut gid = caller.gid;
        if parent_perm & libc::S_ISGID != 0 {
            gid = parent_gid;
            if kind == FileKind::Dir {
                perm |= libc::S_ISGID;
            }
        }
        if kind == FileKind::Symlink {
            perm = 0o777;
        }
        let nlink = if kind == FileKind::Dir { 2 } else { 1 };
        let ino = insert_inode(&mut tx, None, kind, perm, nlink, caller.uid, gid, rdev, parent, target.as_deref(), now)
            .await?;
        insert_dentry(&mut tx, parent, name, ino, kind).await?;
        tx.commit().await?;
        if open {
            self.opens.open(conn, ino);
        }
        let size = target.as_ref().map_or(0, |t| t.len() as u64);
        Ok(Attr {
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
            has_xattrs: false,
        })
    }

    pub(crate) async fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Result<Attr> {
        check_name(new_name)?;
        let mut w = self.store.write().await?;
        let mut tx = w.begin().await?;
        let mut a = get_attr(&mut *tx, ino).await?;
        if a.kind == FileKind::Dir {
            return Err(err(ErrorCode::Perm, "cannot hard-link a directory"));
        }
        if a.nlink == 0 {
            return Err(err(ErrorCode::NotFound, "file was removed"));
        }
        let p = dir_attr(&mut tx, new_parent).await?;
        if p.nlink == 0 {
            return Err(err(ErrorCode::NotFound, "parent directory was removed"));
        }
        if find_dentry(&mut *tx, new_parent, new_name).await?.is_some() {
            return Err(err(ErrorCode::Exists, "entry exists"));
        }
        let now = Timestamp::now();
        insert_dentry(&mut tx, new_parent, new_name, ino, a.kind).await?;
        touch_parent(&mut tx, new_parent, 0, now).await?;
        a.nlink += 1;
        a.ctime = now;
        put_attr(&mut tx, &a).await?;
        tx.commit().await?;
        Ok(a)
    }

    /// Drops one link of `ino` inside a transaction; an inode left with no link and no handle
    /// is freed after a grace period (see [`MetaService::defer_purge`]).
    async fn drop_link(&self, tx: &mut Tx<'_>, ino: Ino, now: Timestamp) -> Result<()> {
        let mut a = get_attr(&mut **tx, ino).await?;
        a.nlink = if a.kind == FileKind::Dir { 0 } else { a.nlink.saturating_sub(1) };
        a.ctime = now;
        put_attr(tx, &a).await?;
        if a.nlink == 0 && !self.opens.is_open(ino) {
            self.defer_purge(ino);
        }
        Ok(())
    }

    pub(crate) async fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        let mut w = self.store.write().await?;
        let mut tx = w.begin().await?;
        // Delete first and validate after: an error drops the transaction, which rolls back.
        let removed: Option<(i64, i64)> =
            sqlx::query_as("DELETE FROM dentries WHERE parent = ? AND name = ? RETURNING ino, kind")
                .bind(parent as i64)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((ino, kind)) = removed else {
            dir_attr(&mut tx, parent).await?;
            return Err(err(ErrorCode::NotFound, "no such entry"));
        };
        if kind == FileKind::Dir.to_i64() {
            return Err(err(ErrorCode::IsDir, "is a directory"));
        }
        let now = Timestamp::now();
        touch_parent(&mut tx, parent, 0, now).await?;
        let left: (i64,) = sqlx::query_as(
            "UPDATE inodes SET nlink = MAX(nlink - 1, 0), ctime_s = ?, ctime_ns = ? WHERE ino = ? RETURNING nlink",
        )
        .bind(now.secs)
        .bind(now.nanos as i64)
        .bind(ino)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        if left.0 == 0 && !self.opens.is_open(ino as u64) {
            self.defer_purge(ino as u64);
        }
        Ok(())
    }

    async fn is_empty_dir(tx: &mut Tx<'_>, ino: Ino) -> Result<bool> {
        let row = sqlx::query("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1")
            .bind(ino as i64)
            .fetch_optional(&mut **tx)
            .await?;
        Ok(row.is_none())
    }

    pub(crate) async fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        if name == b"." {
            return Err(err(ErrorCode::Invalid, "cannot remove '.'"));
        }
        if name == b".." {
            return Err(err(ErrorCode::NotEmpty, "cannot remove '..'"));
        }
        let mut w = self.store.write().await?;
        let mut tx = w.begin().await?;
        dir_attr(&mut tx, parent).await?;
        let Some((ino, kind)) = find_dentry(&mut *tx, parent, name).await? else {
            return Err(err(ErrorCode::NotFound, "no such entry"));
        };
        if kind != FileKind::Dir {
            return Err(err(ErrorCode::NotDir, "not a directory"));
        }
        if !Self::is_empty_dir(&mut tx, ino).await? {
            return Err(err(ErrorCode::NotEmpty, "directory not empty"));
        }
        let now = Timestamp::now();
        delete_dentry(&mut tx, parent, name).await?;
        touch_parent(&mut tx, parent, -1, now).await?;
        self.drop_link(&mut tx, ino, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// True if `dir` is `ancestor` or lies below it.
    async fn is_within(tx: &mut Tx<'_>, mut dir: Ino, ancestor: Ino) -> Result<bool> {
        for _ in 0..100_000 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            let row: Option<(i64,)> = sqlx::query_as("SELECT parent FROM inodes WHERE ino = ?")
                .bind(dir as i64)
                .fetch_optional(&mut **tx)
                .await?;
            match row {
                Some((p,)) => dir = p as u64,
                None => return Ok(false),
            }
        }
        Err(err(ErrorCode::Loop, "directory tree too deep"))
    }

    async fn set_parent(tx: &mut Tx<'_>, ino: Ino, parent: Ino) -> Result<()> {
        sqlx::query("UPDATE inodes SET parent = ? WHERE ino = ?")
            .bind(parent as i64)
            .bind(ino as i64)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn touch_ctime(tx: &mut Tx<'_>, ino: Ino, now: Timestamp) -> Result<()> {
        sqlx::query("UPDATE inodes SET ctime_s = ?, ctime_ns = ? WHERE ino = ?")
            .bind(now.secs)
            .bind(now.nanos as i64)
            .bind(ino as i64)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    pub(crate) async fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Result<()> {
        check_name(new_name)?;
        let mut w = self.store.write().await?;
        let mut tx = w.begin().await?;
        dir_attr(&mut tx, parent).await?;
        let np = dir_attr(&mut tx, new_parent).await?;
        if np.nlink == 0 {
            return Err(err(ErrorCode::NotFound, "target directory was removed"));
        }
        let Some((src, src_kind)) = find_dentry(&mut *tx, parent, name).await? else {
            return Err(err(ErrorCode::NotFound, "no such entry"));
        };
        let dst = find_dentry(&mut *tx, new_parent, new_name).await?;
        if src_kind == FileKind::Dir && Self::is_within(&mut tx, new_parent, src).await? {
            return Err(err(ErrorCode::Invalid, "cannot move a directory into itself"));
        }
        let now = Timestamp::now();
        match (mode, dst) {
            (RenameMode::Exchange, None) => {
                return Err(err(ErrorCode::NotFound, "exchange target does not exist"));
            }
            (RenameMode::NoReplace, Some(_)) => {
                return Err(err(ErrorCode::Exists, "target exists"));
            }
            (_, Some((d, _))) if d == src => return Ok(()),
            (RenameMode::Exchange, Some((dst, dst_kind))) => {
                if dst_kind == FileKind::Dir && Self::is_within(&mut tx, parent, dst).await? {
                    return Err(err(ErrorCode::Invalid, "cannot move a directory into itself"));
                }
                delete_dentry(&mut tx, parent, name).await?;
                delete_dentry(&mut tx, new_parent, new_name).await?;
                insert_dentry(&mut tx, parent, name, dst, dst_kind).await?;
                insert_dentry(&mut tx, new_parent, new_name, src, src_kind).await?;
                let dirs = |k: FileKind| i64::from(k == FileKind::Dir);
                if parent != new_parent {
                    let delta = dirs(dst_kind) - dirs(src_kind);
                    touch_parent(&mut tx, parent, delta, now).await?;
                    touch_parent(&mut tx, new_parent, -delta, now).await?;
                } else {
                    touch_parent(&mut tx, parent, 0, now).await?;
                }
                if src_kind == FileKind::Dir {
                    Self::set_parent(&mut tx, src, new_parent).await?;
                }
                if dst_kind == FileKind::Dir {
                    Self::set_parent(&mut tx, dst, parent).await?;
                }
                Self::touch_ctime(&mut tx, src, now).await?;
                Self::touch_ctime(&mut tx, dst, now).await?;
            }
            (_, existing) => {
                let mut new_parent_links = 0;
                if let Some((dst, dst_kind)) = existing {
                    match (src_kind == FileKind::Dir, dst_kind == FileKind::Dir) {
                        (true, false) => {
                            return Err(err(ErrorCode::NotDir, "target is not a directory"));
                        }
                        (false, true) => {
                            return Err(err(ErrorCode::IsDir, "target is a directory"));
                        }
                        (true, true) if !Self::is_empty_dir(&mut tx, dst).await? => {
                            return Err(err(ErrorCode::NotEmpty, "target directory not empty"));
                        }
                        _ => {}
                    }
                    delete_dentry(&mut tx, new_parent, new_name).await?;
                    if dst_kind == FileKind::Dir {
                        new_parent_links -= 1;
                    }
                    self.drop_link(&mut tx, dst, now).await?;
                }
                delete_dentry(&mut tx, parent, name).await?;
                insert_dentry(&mut tx, new_parent, new_name, src, src_kind).await?;
                if src_kind == FileKind::Dir {
                    Self::set_parent(&mut tx, src, new_parent).await?;
                    if parent != new_parent {
                        touch_parent(&mut tx, parent, -1, now).await?;
                        new_parent_links += 1;
                    }
                }
                if parent != new_parent || src_kind != FileKind::Dir {
                    touch_parent(&mut tx, parent, 0, now).await?;
                }
                touch_parent(&mut tx, new_parent, new_parent_links, now).await?;
                Self::touch_ctime(&mut tx, src, now).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let row: Option<(i64, Option<Vec<u8>>)> = sqlx::query_as("SELECT kind, target FROM inodes WHERE ino = ?")
            .bind(ino as i64)
            .fetch_optional(&self.store.readers)
            .await?;
        match row {
            None => Err(err(ErrorCode::NotFound, "no such inode")),
            Some((kind, Some(t))) if kind == FileKind::Symlink.to_i64() => Ok(t),
            Some(_) => Err(err(ErrorCode::Invalid, "not a symlink")),
        }
    }

    pub(crate) async fn readdir(&self, ino: Ino, after: u64, limit: u32, plus: bool) -> Result<Vec<DirEntry>> {
        let a = get_attr(&self.store.readers, ino).await?;
        if a.kind != FileKind::Dir {
            return Err(err(ErrorCode::NotDir, "not a directory"));
        }
        let limit = limit.clamp(1, 4096) as i64;
        let rows = if plus {
            sqlx::query(
                "SELECT d.cookie, d.name, i.ino, i.kind, i.perm, i.nlink, i.uid, i.gid, i.rdev, i.size, \
                 i.atime_s, i.atime_ns, i.mtime_s, i.mtime_ns, i.ctime_s, i.ctime_ns, i.crtime_s, i.crtime_ns, i.xattrs \
                 FROM dentries d JOIN inodes i ON i.ino = d.ino WHERE d.parent = ? AND d.cookie > ? \
                 ORDER BY d.cookie LIMIT ?",
            )
        } else {
            sqlx::query(
                "SELECT cookie, name, ino, kind FROM dentries WHERE parent = ? AND cookie > ? ORDER BY cookie LIMIT ?",
            )
        }
        .bind(ino as i64)
        .bind(after as i64)
        .bind(limit)
        .fetch_all(&self.store.readers)
        .await?;
        rows.iter()
            .map(|row| {
                let kind: i64 = row.try_get("kind")?;
                Ok(DirEntry {
                    name: row.try_get("name")?,
                    ino: row.try_get::<i64, _>("ino")? as u64,
                    kind: FileKind::from_i64(kind).ok_or_else(|| err(ErrorCode::Io, "bad kind"))?,
                    cookie: row.try_get::<i64, _>("cookie")? as u64,
                    attr: if plus { Some(store::attr_from_row(row)?) } else { None },
                })
            })
            .collect()
    }

    pub(crate) async fn open(&self, conn: usize, ino: Ino) -> Result<Attr> {
        // Under the writer lock so an open cannot slip between an unlink's check and its purge.
        let _w = self.store.write().await?;
        let a = get_attr(&self.store.readers, ino).await?;
        self.opens.open(conn, ino);
        Ok(a)
    }

    pub(crate) async fn close(&self, conn: usize, ino: Ino) -> Result<()> {
        // Under the writer lock so no unlink is half done while the link count is checked.
        let _w = self.store.write().await?;
        if self.opens.close(conn, ino) && get_attr(&self.store.readers, ino).await.is_ok_and(|a| a.nlink == 0) {
            self.defer_purge(ino);
        }
        Ok(())
    }

    /// Drops a disconnected client's handles and frees files only it kept alive.
    pub(crate) async fn connection_lost(&self, conn: usize) -> Result<()> {
        let closed = self.opens.drop_conn(conn);
        if closed.is_empty() {
            return Ok(());
        }
        let _w = self.store.write().await?;
        for ino in closed {
            if !self.opens.is_open(ino) && get_attr(&self.store.readers, ino).await.is_ok_and(|a| a.nlink == 0) {
                self.defer_purge(ino);
            }
        }
        Ok(())
    }

    pub(crate) async fn setattr(&self, ino: Ino, set: &SetAttrs) -> Result<Attr> {
        let mut w = self.store.write().await?;
        let mut tx = w.begin().await?;
        let mut a = get_attr(&mut *tx, ino).await?;
        let now = Timestamp::now();
        if let Some(perm) = set.perm {
            a.perm = perm & 0o7777;
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
                self.truncate_data(&mut tx, ino, size).await?;
            }
            a.size = size;
            a.mtime = now;
        }
        let resolve = |t: TimeSet| match t {
            TimeSet::Now => now,
            TimeSet::At(ts) => ts,
        };
        if let Some(t) = set.atime {
            a.atime = resolve(t);
        }
        if let Some(t) = set.mtime {
            a.mtime = resolve(t);
        }
        a.ctime = set.ctime.unwrap_or(now);
        put_attr(&mut tx, &a).await?;
        tx.commit().await?;
        Ok(a)
    }

    pub(crate) async fn set_xattr(&self, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode) -> Result<()> {
        if name.is_empty() || name.len() > XATTR_NAME_MAX {
            return Err(err(ErrorCode::Range, "xattr name length out of range"));
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(err(ErrorCode::TooBig, "xattr value too large"));
        }
        let mut w = self.store.write().await?;
        let mut tx = w.begin().await?;
        get_attr(&mut *tx, ino).await?;
        let exists = sqlx::query("SELECT 1 FROM xattrs WHERE ino = ? AND name = ?")
            .bind(ino as i64)
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        match (mode, exists) {
            (XattrMode::Create, true) => return Err(err(ErrorCode::Exists, "xattr exists")),
            (XattrMode::Replace, false) => return Err(err(ErrorCode::NoData, "no such xattr")),
            _ => {}
        }
        sqlx::query("INSERT OR REPLACE INTO xattrs (ino, name, value) VALUES (?, ?, ?)")
            .bind(ino as i64)
            .bind(name)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE inodes SET xattrs = 1 WHERE ino = ?").bind(ino as i64).execute(&mut *tx).await?;
        Self::touch_ctime(&mut tx, ino, Timestamp::now()).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn get_xattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        let row: Option<(Vec<u8>,)> = sqlx::query_as("SELECT value FROM xattrs WHERE ino = ? AND name = ?")
            .bind(ino as i64)
            .bind(name)
            .fetch_optional(&self.store.readers)
            .await?;
        match row {
            Some((v,)) => Ok(v),
            None => {
                get_attr(&self.store.readers, ino).await?;
                Err(err(ErrorCode::NoData, "no such xattr"))
            }
        }
    }

    pub(crate) async fn list_xattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        get_attr(&self.store.readers, ino).await?;
        let rows: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT name FROM xattrs WHERE ino = ? ORDER BY name")
            .bind(ino as i64)
            .fetch_all(&self.store.readers)
            .await?;
        Ok(rows.into_iter().map(|(n,)| n).collect())
    }

    pub(crate) async fn remove_xattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        let mut w = self.store.write().await?;
        let mut tx = w.begin().await?;
        get_attr(&mut *tx, ino).await?;
        let done = sqlx::query("DELETE FROM xattrs WHERE ino = ? AND name = ?")
            .bind(ino as i64)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(err(ErrorCode::NoData, "no such xattr"));
        }
        sqlx::query("UPDATE inodes SET xattrs = EXISTS (SELECT 1 FROM xattrs WHERE ino = ?1) WHERE ino = ?1")
            .bind(ino as i64)
            .execute(&mut *tx)
            .await?;
        Self::touch_ctime(&mut tx, ino, Timestamp::now()).await?;
        tx.commit().await?;
        Ok(())
    }
}
