//! Namespace calls: thin wrappers over metadata requests, plus name checks done locally.

use crate::{Client, ClientError, Entry, Result, unexpected};
use cairn_proto::meta::*;
use cairn_proto::*;
use std::sync::Arc;
use std::time::Duration;

/// Files up to this size opened read-only have their data fetched as the open returns.
pub(crate) const PREFETCH_ON_OPEN: u64 = 1 << 20;

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(ClientError::new(ErrorCode::NameTooLong, format!("name of {} bytes", name.len())));
    }
    Ok(())
}

impl Client {
    /// Looks `name` up in `parent`, from a directory listing when one is at hand (see
    /// `listing`). A missing name is an entry without attributes, which the kernel may
    /// remember as long as a found one; "." and ".." are never missing.
    pub async fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Entry> {
        check_name(name)?;
        self.check_session();
        let dots = name == b"." || name == b"..";
        if !dots && let Some(mut hit) = self.listed(parent, name).await {
            hit.ttl = hit.ttl.min(self.kernel_ttl());
            return Ok(hit);
        }
        let ttl = self.kernel_ttl();
        match self.call_attr(MetaRequest::Lookup { parent, name: name.to_vec() }).await {
            Ok(a) => Ok(Entry { attr: Some(a), ttl }),
            Err(e) if e.code == ErrorCode::NotFound && !dots => Ok(Entry { attr: None, ttl }),
            Err(e) => Err(e),
        }
    }

    pub async fn getattr(&self, ino: Ino) -> Result<Attr> {
        Ok(self.stat(ino).await?.0)
    }

    /// The attributes of `ino` and how long the kernel may keep them: from this client's
    /// recent answers when it has them (see `attrs`), else from the server.
    pub async fn stat(&self, ino: Ino) -> Result<(Attr, Duration)> {
        if let Some(cached) = self.cached_stat(ino) {
            return Ok(cached);
        }
        Ok((self.call_attr(MetaRequest::GetAttr { ino }).await?, self.kernel_ttl()))
    }

    /// [`Client::stat`] when the caches answer it, without waiting: the mount answers the
    /// kernel's `GETATTR` on its own thread then (the kernel asks after every read of a file,
    /// since a read may have changed its atime).
    pub fn cached_stat(&self, ino: Ino) -> Option<(Attr, Duration)> {
        self.check_session();
        let ttl = self.kernel_ttl();
        if let Some(mut a) = self.dir_attrs.get(&ino) {
            self.atimes.note(&mut a);
            return Some((a, ttl));
        }
        let (a, left) = self.file_attrs.get(ino)?;
        Some((self.note_attr(a), left.min(ttl)))
    }

    /// Changes attributes; a size change first flushes buffered writes so they cannot land
    /// past the new end of file afterwards.
    pub async fn setattr(self: &Arc<Self>, ino: Ino, set: SetAttrs, caller: Caller) -> Result<Attr> {
        if let Some(attr) = self.buffer_setattr(ino, &set, &caller).await? {
            return Ok(attr);
        }
        // Buffered writes land first, so neither a new size nor explicit times (cp -p) are
        // overwritten by a later commit of older data.
        self.flush(ino, false).await?;
        if set.atime.is_some() {
            self.atimes.forget(ino);
        }
        let attr = self.call_attr(MetaRequest::SetAttr { ino, set: set.clone(), caller }).await?;
        if set.size.is_some() {
            self.invalidate_data(ino);
            self.sizes.insert(ino, attr.size);
        }
        Ok(attr)
    }

    /// Creates a file, directory, device, fifo, socket or symlink.
    #[allow(clippy::too_many_arguments)]
    pub async fn make_node(
        &self,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        umask: u32,
        rdev: u32,
        target: Option<Vec<u8>>,
        caller: Caller,
        open: bool,
    ) -> Result<Attr> {
        check_name(name)?;
        let req = MetaRequest::MakeNode { parent, name: name.to_vec(), kind, perm, rdev, target, caller, umask, open };
        let attr = self.call_changed(req).await?.ok_or_else(|| unexpected(MetaResponse::Empty))?;
        match (open, kind) {
            (true, FileKind::File) => self.created(attr.ino),
            (true, _) => self.opened(attr.ino),
            (false, _) => {}
        }
        Ok(attr)
    }

    pub async fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Result<Attr> {
        check_name(new_name)?;
        let req = MetaRequest::Link { ino, new_parent, new_name: new_name.to_vec() };
        self.call_changed(req).await?.ok_or_else(|| unexpected(MetaResponse::Empty))
    }

    pub async fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        check_name(name)?;
        self.call_changed(MetaRequest::Unlink { parent, name: name.to_vec() }).await.map(drop)
    }

    pub async fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        check_name(name)?;
        self.call_changed(MetaRequest::Rmdir { parent, name: name.to_vec() }).await.map(drop)
    }

    pub async fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Result<()> {
        check_name(name)?;
        check_name(new_name)?;
        let req = MetaRequest::Rename { parent, name: name.to_vec(), new_parent, new_name: new_name.to_vec(), mode };
        self.call_changed(req).await.map(drop)
    }

    pub async fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        match self.call(MetaRequest::ReadLink { ino }).await? {
            MetaResponse::Link(t) => Ok(t),
            other => Err(unexpected(other)),
        }
    }

    /// Up to `limit` entries after `cookie` (0 to start).
    pub async fn readdir(self: &Arc<Self>, ino: Ino, after: u64, limit: u32, plus: bool) -> Result<Vec<DirEntry>> {
        let epoch = self.listings.next_epoch();
        match self.call(MetaRequest::ReadDir { ino, after, limit, plus }).await? {
            MetaResponse::Dir(mut entries) => {
                if after == 0 {
                    self.accessed(ino, true);
                }
                self.note_open_hints(ino, &mut entries, epoch);
                if after == 0 && plus && entries.len() < limit as usize {
                    self.listed_whole(ino, epoch, &entries);
                }
                for e in &mut entries {
                    if let Some(a) = e.attr.take() {
                        let a = self.note_attr(a);
                        self.keep_listed_dir(&a, epoch);
                        e.attr = Some(a);
                    }
                }
                if after == 0 {
                    self.walked(ino, &entries);
                }
                Ok(entries)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Opens a directory for listing; true if the kernel may list it from what it cached at
    /// an earlier open. That holds while the directory's generation (bumped by a recall of
    /// its lease and by a lapsed session) is what it was then, for at most the map TTL: the
    /// read lease the listing brought outlives that, so any change by another client in
    /// between was recalled. The kernel itself drops its cache after this client's own
    /// changes in the directory.
    pub fn open_dir(&self, ino: Ino) -> bool {
        self.check_session();
        let generation = self.data_generation(ino);
        let keep = self.dir_pages.get(&ino) == Some(generation);
        if !keep {
            self.dir_pages.insert(ino, generation);
        }
        keep
    }

    /// Opens a file: registers the handle with the metadata server. Opening an immutable
    /// file for writing, or an append-only one for writing without `O_APPEND`, is EPERM (the
    /// kernel leaves these checks to FUSE). Returns the attributes, and whether the kernel may
    /// keep the pages it cached at earlier opens: only if no recall or lapsed session came
    /// since (they drop the file's `PageState`) and its size, mtime and ctime on the server
    /// are what they were at the previous open. This client's own changes went through the
    /// kernel, so they do not count.
    pub async fn open(self: &Arc<Self>, ino: Ino, write: bool, append: bool) -> Result<(Attr, bool)> {
        let generation = self.data_generation(ino);
        let hinted = match write {
            true => None,
            false => {
                let hinted = self.prefetch_hinted(ino);
                self.read_ahead_files(ino);
                hinted
            }
        };
        let attr = match self.call(MetaRequest::Open { ino }).await? {
            MetaResponse::Opened { attr, first_map } => {
                if let Some(map) = first_map {
                    // Under the generation seen before asking: a commit of this client since
                    // then retires it.
                    self.maybe_compact(ino, 0, map.len());
                    let fetching = hinted.as_deref() == Some(&map);
                    self.maps.insert((ino, generation, 0), Arc::new(map)).await;
                    // A small file opened for reading is about to be read whole: start
                    // fetching it now rather than one kernel round trip later (unless that
                    // started by the same map already).
                    if !write && attr.size <= PREFETCH_ON_OPEN && !fetching {
                        let client = self.clone();
                        tokio::spawn(async move { client.prefetch(ino, 0, attr.size).await });
                    }
                }
                self.note_attr(attr)
            }
            other => return Err(unexpected(other)),
        };
        self.opened(ino);
        let locked = match attr.flags {
            f if f & inode_flags::IMMUTABLE != 0 => write,
            f if f & inode_flags::APPEND != 0 => write && !append,
            _ => false,
        };
        if locked {
            self.release(ino).await?;
            return Err(ClientError::new(ErrorCode::Perm, "the file is immutable or append-only"));
        }
        // The attributes come from the server, which commits change with mtime or ctime: a
        // change this client missed (its read lease ended, its session lapsed) shows there.
        let now = crate::PageState::of(&attr);
        // A recall during the open may have come after the attributes were read.
        let keep = self.data_generation(ino) == generation && self.page_states.get(&ino).as_ref() == Some(&now);
        self.page_states.insert(ino, now);
        Ok((attr, keep))
    }

    /// Closes a handle: flushes buffered writes, then drops the registration. Writes still
    /// buffered under the write lease are stored and committed in the background instead
    /// (write-behind, see `write`), and the registration dropped after them.
    pub async fn release(self: &Arc<Self>, ino: Ino) -> Result<()> {
        if self.behind_write(ino) {
            return Ok(());
        }
        let flushed = self.flush(ino, false).await;
        self.closed(ino);
        self.send_close(ino);
        flushed
    }

    /// Drops a handle's registration with the metadata server. Needs no answer: the server
    /// orders it after every earlier request of this client that could observe it, and a
    /// lost one is cleaned up with the connection. Not waiting saves a round trip on every
    /// close.
    pub(crate) fn send_close(self: &Arc<Self>, ino: Ino) {
        let client = self.clone();
        tokio::spawn(async move {
            if let Err(e) = client.call_empty(MetaRequest::Close { ino }).await {
                tracing::debug!(ino, "close registration: {e}");
            }
        });
    }

    pub async fn fallocate(
        self: &Arc<Self>,
        ino: Ino,
        mode: FallocMode,
        offset: u64,
        len: u64,
        caller: Caller,
    ) -> Result<Attr> {
        self.flush(ino, false).await?;
        let attr = self.call_attr(MetaRequest::Fallocate { ino, mode, offset, len, caller }).await?;
        self.invalidate_data(ino);
        Ok(attr)
    }

    pub async fn set_xattr(&self, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode, caller: Caller) -> Result<()> {
        self.xattrs_changed.insert(ino, ());
        self.no_xattrs.invalidate(&ino);
        if name.len() > XATTR_NAME_MAX {
            return Err(ClientError::new(ErrorCode::Range, "xattr name too long"));
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(ClientError::new(ErrorCode::TooBig, "xattr value too large"));
        }
        self.xattr_misses.invalidate(&(ino, name.to_vec()));
        let req = MetaRequest::SetXattr { ino, name: name.to_vec(), value: value.to_vec(), mode, caller };
        self.call_empty(req).await
    }

    /// The error for a getxattr that needs no server: over-long names, names Cairn does not
    /// store, inodes recently seen without any xattr, and names recently found missing (for
    /// the attribute TTL, as the kernel caches attributes).
    pub fn known_xattr_miss(&self, ino: Ino, name: &[u8]) -> Option<ClientError> {
        if name.len() > XATTR_NAME_MAX {
            return Some(ClientError::new(ErrorCode::Range, "xattr name too long"));
        }
        // Refused by the metadata server too; `ls -l` asks every file for it.
        if xattr_unsupported(name) {
            let what = format!("{} is not supported", String::from_utf8_lossy(name));
            return Some(ClientError::new(ErrorCode::NotSupported, what));
        }
        let missing = self.no_xattrs.contains_key(&ino) || self.xattr_misses.contains_key(&(ino, name.to_vec()));
        missing.then(|| ClientError::new(ErrorCode::NoData, "no such xattr"))
    }

    pub async fn get_xattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        self.check_session();
        if let Some(e) = self.known_xattr_miss(ino, name) {
            return Err(e);
        }
        match self.call(MetaRequest::GetXattr { ino, name: name.to_vec() }).await {
            Ok(MetaResponse::Xattr(v)) => Ok(v),
            Ok(other) => Err(unexpected(other)),
            Err(e) => {
                if e.code == ErrorCode::NoData {
                    self.xattr_misses.insert((ino, name.to_vec()), ());
                }
                Err(e)
            }
        }
    }

    pub async fn list_xattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        self.check_session();
        if self.no_xattrs.contains_key(&ino) {
            return Ok(Vec::new());
        }
        match self.call(MetaRequest::ListXattr { ino }).await? {
            MetaResponse::XattrNames(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    pub async fn remove_xattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        self.call_empty(MetaRequest::RemoveXattr { ino, name: name.to_vec() }).await
    }

    pub async fn statfs(&self) -> Result<FsStats> {
        match self.call(MetaRequest::StatFs).await? {
            MetaResponse::StatFs(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Makes all metadata changes so far durable (fsync of a directory).
    pub async fn sync_metadata(&self) -> Result<()> {
        self.call_empty(MetaRequest::Sync).await
    }
}
