//! Blocks on disk: small ones as rows of `<data>/blocks/small.db` (see `small`), the others as
//! files `<data>/blocks/<slice % 256 as hex>/<slice as hex>-<index>`.

use crate::small::{SMALL_MAX, SmallBlocks};
use crate::spares::Spares;
use aligned_vec::{AVec, ConstAlign};
use cairn_net::Bytes;
use cairn_proto::chunk::BlockKey;
use cairn_proto::{ErrorCode, SliceId};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Blocks at least this large are written with `O_DIRECT` (see [`create_block_file`]).
const DIRECT_MIN: usize = 256 << 10;
/// Buffer address and length alignment that `O_DIRECT` needs (the largest logical sector size
/// of common disks).
const DIRECT_ALIGN: usize = 4096;

thread_local! {
    /// Each blocking-pool thread's staging buffer for `O_DIRECT` writes, reused so that its pages
    /// stay mapped.
    static STAGING: std::cell::RefCell<AVec<u8, ConstAlign<DIRECT_ALIGN>>> =
        std::cell::RefCell::new(AVec::new(DIRECT_ALIGN));
}

/// Creates the file `path` holding `block`. Large blocks bypass the page cache with `O_DIRECT`:
/// filling fresh page-cache pages costs CPU (`dd` here: 0.5–0.9 s of system time per GiB
/// against 0.08 s direct), and on 2 cores that CPU is taken from the client (a 1 GiB write:
/// 6.9 → 6.5 s of CPU in all, 268 → 290 MiB/s). Filesystems without `O_DIRECT` get a plain write.
fn create_block_file(path: &Path, block: &[u8]) -> std::io::Result<std::fs::File> {
    let open =
        |flags| std::fs::OpenOptions::new().write(true).create(true).truncate(true).custom_flags(flags).open(path);
    if block.len() >= DIRECT_MIN {
        match open(libc::O_DIRECT).and_then(|f| write_direct(&f, block).map(|()| f)) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            done => return done,
        }
    }
    let mut f = open(0)?;
    f.write_all(block)?;
    if block.len() >= DIRECT_MIN {
        start_writeback(&f);
    }
    Ok(f)
}

/// Writes `block` to the empty `O_DIRECT` file `f`: the whole sectors from an aligned copy,
/// then the last partial sector through the page cache. (Padding that sector and cutting the
/// file back instead would make the filesystem read it back in to zero the padding, and
/// leave it dirty.)
fn write_direct(f: &std::fs::File, block: &[u8]) -> std::io::Result<()> {
    let (sectors, tail) = block.split_at(block.len() / DIRECT_ALIGN * DIRECT_ALIGN);
    STAGING.with_borrow_mut(|buf| {
        buf.clear();
        buf.extend_from_slice(sectors);
        (&*f).write_all(buf)
    })?;
    if !tail.is_empty() {
        clear_direct(f)?;
        (&*f).write_all(tail)?;
        start_writeback(f);
    }
    Ok(())
}

/// Reads a whole block file, through the page cache: reading with `O_DIRECT` instead cut
/// cold sequential reads from 313 to 216 MiB/s and re-reads of blocks the client had evicted
/// from 2,760 to 694 MiB/s in the peer benchmark (no readahead, and no cache for re-reads).
fn read_block_file(path: &Path) -> std::io::Result<Bytes> {
    Ok(std::fs::read(path)?.into())
}

/// Bytes read first when serving one frame: the header and the table of a block of up to
/// 5 MiB, so one read usually finds where the frame is.
const HEAD_READ: usize = 4096;

/// Reads from the start of `f` until `buf` is full or the file ends; returns the bytes read.
fn read_up_to(f: &std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Turns `O_DIRECT` off for an open file.
fn clear_direct(f: &std::fs::File) -> std::io::Result<()> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(f);
    // SAFETY: fcntl on a descriptor we own, clearing one status flag.
    let ok = unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) & !libc::O_DIRECT) == 0 };
    if ok { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Asks the kernel to start writing a file's dirty pages now, without waiting, so that a
/// later fsync finds little left to do. Only a hint: failures are ignored.
fn start_writeback(f: &std::fs::File) {
    // SAFETY: sync_file_range on a descriptor we own, over the whole file (0, 0).
    unsafe { libc::sync_file_range(std::os::fd::AsRawFd::as_raw_fd(f), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Up to this many blocks are synced one by one; more take one `syncfs` (see [`BlockStore::sync`]).
const SYNC_EACH_MAX: usize = 32;

/// Why a block operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("block {0:?} not found")]
    NotFound(BlockKey),
    #[error("block {key:?} is corrupt: {reason}")]
    Corrupt { key: BlockKey, reason: String },
    #[error("refusing malformed block {key:?}: {reason}")]
    Malformed { key: BlockKey, reason: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("small block database: {0}")]
    Db(#[from] rusqlite::Error),
}

impl StoreError {
    /// The code reported to the caller.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::NotFound(_) => ErrorCode::NotFound,
            StoreError::Corrupt { .. } => ErrorCode::Corrupt,
            StoreError::Malformed { .. } => ErrorCode::BadRequest,
            StoreError::Io(e) => ErrorCode::from_errno(e.raw_os_error().unwrap_or(libc::EIO)),
            StoreError::Db(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DiskFull => {
                ErrorCode::NoSpace
            }
            StoreError::Db(_) => ErrorCode::Io,
        }
    }
}

/// Runs blocking file work on tokio's blocking pool, off the server's one network thread.
pub(crate) async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Io(std::io::Error::other(e)))?
}

/// A block's file name: slice and index.
fn name_of(key: BlockKey) -> String {
    format!("{:016x}-{}", key.slice, key.index)
}

/// The directory of the blocks of slices whose id modulo 256 is `bucket`.
fn bucket_dir(root: &Path, bucket: u8) -> PathBuf {
    root.join(format!("{bucket:02x}"))
}

/// A chunk server's blocks: small ones in a database (see `small`), the others in files.
#[derive(Debug, Clone)]
pub struct BlockStore {
    root: PathBuf,
    spares: Arc<Spares>,
    small: Arc<SmallBlocks>,
}

impl BlockStore {
    /// Opens (creating if needed) the block directory under `data_dir`.
    pub fn open(data_dir: &Path) -> std::io::Result<BlockStore> {
        let root = data_dir.join("blocks");
        std::fs::create_dir_all(&root)?;
        // Every bucket directory now, and durably, rather than at a bucket's first block: a
        // directory costs ext4 an inode allocation, which on a filesystem without a journal
        // steps over every inode freed lately (see `spares`), and a fresh server's first
        // gigabyte of writes would make all 256 of them.
        let mut made = false;
        for bucket in 0..=u8::MAX {
            match std::fs::create_dir(bucket_dir(&root, bucket)) {
                Ok(()) => made = true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        if made {
            std::fs::File::open(&root)?.sync_all()?;
        }
        let spares = Arc::new(Spares::open(&root)?);
        let small = Arc::new(SmallBlocks::open(&root).map_err(std::io::Error::other)?);
        Ok(BlockStore { root, spares, small })
    }

    fn dir_of(&self, key: BlockKey) -> PathBuf {
        bucket_dir(&self.root, (key.slice % 256) as u8)
    }

    fn path_of(&self, key: BlockKey) -> PathBuf {
        self.dir_of(key).join(name_of(key))
    }

    /// Stores a block after checking its format; with `sync` it is on disk when this returns.
    pub fn put(&self, key: BlockKey, block: &[u8], sync: bool) -> Result<(), StoreError> {
        self.put_many(&[(key, block)], sync)
    }

    /// Stores blocks after checking the format of each (none is stored if one is malformed):
    /// the small ones in one transaction. With `sync` they are on disk when this returns.
    pub fn put_many(&self, blocks: &[(BlockKey, &[u8])], sync: bool) -> Result<(), StoreError> {
        for (key, block) in blocks {
            cairn_block::verify(block).map_err(|e| StoreError::Malformed { key: *key, reason: e.to_string() })?;
        }
        let (small, large): (Vec<_>, Vec<_>) = blocks.iter().copied().partition(|(_, b)| b.len() < SMALL_MAX);
        if !small.is_empty() {
            self.small.put(&small, sync)?;
        }
        large.into_iter().try_for_each(|(key, block)| self.put_file(key, block, sync))
    }

    /// Stores a large, checked block as a file.
    fn put_file(&self, key: BlockKey, block: &[u8], sync: bool) -> Result<(), StoreError> {
        let dir = self.dir_of(key);
        let path = self.path_of(key);
        let tmp = dir.join(format!(".tmp-{:016x}-{}-{:08x}", key.slice, key.index, rand::random::<u32>()));
        let write = || -> std::io::Result<()> {
            // A spare file saves allocating an inode (see `spares`); made durable before the
            // block is, so it cannot come back as a spare after a crash.
            if self.spares.take(&tmp) && sync {
                self.spares.sync()?;
            }
            let f = create_block_file(&tmp, block)?;
            if sync {
                f.sync_data()?;
            }
            std::fs::rename(&tmp, &path)?;
            if sync {
                std::fs::File::open(&dir)?.sync_all()?;
            }
            Ok(())
        };
        write().inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        Ok(())
    }

    /// Makes already stored blocks durable (they were written without `sync`). Many blocks
    /// (an fsync after thousands of small random writes) are flushed with one `syncfs` of the
    /// block filesystem instead of one fsync each, which would take seconds.
    pub fn sync(&self, keys: &[BlockKey]) -> Result<(), StoreError> {
        // First the spare pool, which the blocks may have taken their files from.
        self.spares.sync()?;
        let mut dirs = std::collections::BTreeSet::new();
        let mut files = Vec::new();
        let mut small = false;
        for key in keys {
            match std::fs::symlink_metadata(self.path_of(*key)) {
                Ok(_) => {
                    files.push(*key);
                    dirs.insert(self.dir_of(*key));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.small.contains(*key)? => small = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::NotFound(*key)),
                Err(e) => return Err(e.into()),
            }
        }
        if small {
            self.small.sync()?;
        }
        if files.len() > SYNC_EACH_MAX {
            let root = std::fs::File::open(&self.root)?;
            // SAFETY: syncfs on a descriptor we own and keep open for the call.
            if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&root)) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            return Ok(());
        }
        for key in files {
            std::fs::File::open(self.path_of(key))?.sync_data()?;
        }
        for d in dirs {
            std::fs::File::open(d)?.sync_all()?;
        }
        Ok(())
    }

    /// Reads a block and verifies its checksum; a bad block is an error, never returned.
    pub fn get(&self, key: BlockKey) -> Result<Bytes, StoreError> {
        let data = match self.small.get(key)? {
            Some(d) => d.into(),
            None => self.get_file(key)?,
        };
        cairn_block::verify(&data).map_err(|e| StoreError::Corrupt { key, reason: e.to_string() })?;
        Ok(data)
    }

    /// Frame `frame` of a framed block, behind the block's header and table, checked (`true`);
    /// a block of an earlier format, which has no frames, whole (`false`). Only the header,
    /// the table and the frame are read.
    pub fn get_frame(&self, key: BlockKey, frame: u32) -> Result<(bool, Bytes), StoreError> {
        use std::os::unix::fs::FileExt;
        let corrupt = |e: cairn_block::BlockError| StoreError::Corrupt { key, reason: e.to_string() };
        let no_frame = || StoreError::Malformed { key, reason: format!("the block has no frame {frame}") };
        if let Some(d) = self.small.get(key)? {
            if cairn_block::frames::table_end(&d).map_err(corrupt)?.is_none() {
                return self.get(key).map(|b| (false, b));
            }
            let part = cairn_block::frame_part(&d, frame as usize).map_err(corrupt)?.ok_or_else(no_frame)?;
            return Ok((true, part.into()));
        }
        let file = match std::fs::File::open(self.path_of(key)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::NotFound(key)),
            Err(e) => return Err(e.into()),
        };
        let mut head = vec![0; HEAD_READ];
        let got = read_up_to(&file, &mut head)?;
        head.truncate(got);
        let Some(table_end) = cairn_block::frames::table_end(&head).map_err(corrupt)? else {
            return self.get(key).map(|b| (false, b));
        };
        let short = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                StoreError::Corrupt { key, reason: "the block file is cut short".into() }
            }
            _ => e.into(),
        };
        if got < table_end {
            head.resize(table_end, 0);
            file.read_exact_at(&mut head[got..], got as u64).map_err(short)?;
        }
        head.truncate(table_end);
        let frames = cairn_block::frames::Frames::parse(&head).map_err(corrupt)?;
        let extent = frames.extent(frame as usize).ok_or_else(no_frame)?;
        head.resize(table_end + extent.len(), 0);
        file.read_exact_at(&mut head[table_end..], extent.start as u64).map_err(short)?;
        frames.check(frame as usize, &head[table_end..]).map_err(corrupt)?;
        Ok((true, head.into()))
    }

    fn get_file(&self, key: BlockKey) -> Result<Bytes, StoreError> {
        match read_block_file(&self.path_of(key)) {
            Ok(d) => Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::NotFound(key)),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes blocks; missing ones are fine.
    pub fn delete(&self, keys: &[BlockKey]) -> Result<(), StoreError> {
        for key in &self.small.delete(keys)? {
            match self.spares.recycle(&self.path_of(*key), &name_of(*key)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The blocks stored in bucket `bucket` (slice id modulo 256), sorted; in-progress (`.tmp-`) files are skipped.
    pub fn bucket_blocks(&self, bucket: u8) -> Result<Vec<BlockKey>, StoreError> {
        let mut keys = self.small.bucket(bucket)?;
        let entries = match std::fs::read_dir(bucket_dir(&self.root, bucket)) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                keys.sort();
                return Ok(keys);
            }
            Err(e) => return Err(e.into()),
        };
        for entry in entries {
            let name = entry?.file_name();
            let Some((slice, index)) = name.to_str().and_then(|n| n.split_once('-')) else { continue };
            if let (Ok(slice), Ok(index)) = (SliceId::from_str_radix(slice, 16), index.parse()) {
                keys.push(BlockKey { slice, index });
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// `(capacity, free)` bytes of the filesystem holding the blocks.
    pub fn usage(&self) -> std::io::Result<(u64, u64)> {
        let path = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is a valid NUL-terminated string and `st` a valid out-pointer.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let frsize = st.f_frsize as u64;
        Ok((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flips the last byte of the block `key` in the small block database, behind the store.
    fn corrupt_row(dir: &Path, key: BlockKey) {
        let db = rusqlite::Connection::open(dir.join("blocks/small.db")).unwrap();
        let at = rusqlite::params![key.slice as i64, key.index];
        let mut data: Vec<u8> =
            db.query_row("SELECT data FROM blocks WHERE slice = ?1 AND idx = ?2", at, |r| r.get(0)).unwrap();
        *data.last_mut().unwrap() ^= 0xff;
        db.execute(
            "UPDATE blocks SET data = ?3 WHERE slice = ?1 AND idx = ?2",
            rusqlite::params![key.slice as i64, key.index, data],
        )
        .unwrap();
    }

    #[test]
    fn frames_are_served_alone_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let codec = cairn_block::Codec::plain();
        let data: Vec<u8> = (0..300_000u32).map(|b| (b * 7) as u8).collect();
        let (small, large) = (BlockKey { slice: 3, index: 0 }, BlockKey { slice: 4, index: 0 });
        let small_block = codec.encode(cairn_block::BlockId { slice: 3, index: 0 }, &data[..5_000]);
        let large_block = codec.encode(cairn_block::BlockId { slice: 4, index: 0 }, &data);
        store.put(small, &small_block, false).unwrap();
        store.put(large, &large_block, false).unwrap();
        assert_eq!(
            store.get_frame(small, 0).unwrap(),
            (true, cairn_block::frame_part(&small_block, 0).unwrap().unwrap().into())
        );
        let n = data.len().div_ceil(cairn_block::FRAME) as u32;
        for f in 0..n {
            let want = cairn_block::frame_part(&large_block, f as usize).unwrap().unwrap();
            assert_eq!(store.get_frame(large, f).unwrap(), (true, want.into()), "frame {f}");
        }
        assert!(matches!(store.get_frame(large, n), Err(StoreError::Malformed { .. })));
        assert!(matches!(store.get_frame(small, 1), Err(StoreError::Malformed { .. })));
        assert!(matches!(store.get_frame(BlockKey { slice: 5, index: 0 }, 0), Err(StoreError::NotFound(_))));
        // A block of the unframed format 1 is served whole.
        let old = BlockKey { slice: 6, index: 0 };
        let mut v1 = [&b"CBLK\x01\0\0\0"[..], &3u32.to_le_bytes(), &3u32.to_le_bytes()].concat();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&v1), b"old");
        v1.extend_from_slice(&crc.to_le_bytes());
        v1.extend_from_slice(b"old");
        store.put(old, &v1, false).unwrap();
        assert_eq!(store.get_frame(old, 0).unwrap(), (false, v1.into()));
        // A flipped byte in the last frame fails that frame only.
        let path = store.path_of(large);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 100;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(store.get_frame(large, n - 1), Err(StoreError::Corrupt { .. })));
        assert!(store.get_frame(large, n - 2).is_ok());
        std::fs::write(&path, &bytes[..bytes.len() - 200]).unwrap();
        assert!(matches!(store.get_frame(large, n - 1), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn put_many_refuses_all_when_one_block_is_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let block = |slice: u64, len: usize| {
            cairn_block::Codec::plain().encode(cairn_block::BlockId { slice, index: 0 }, &vec![slice as u8; len])
        };
        let (small, large) = (block(1, 100), block(2, SMALL_MAX + 10));
        let keys = [BlockKey { slice: 1, index: 0 }, BlockKey { slice: 2, index: 0 }, BlockKey { slice: 3, index: 0 }];
        let refused = store.put_many(&[(keys[0], &small), (keys[2], b"not a block"), (keys[1], &large)], false);
        assert!(matches!(refused, Err(StoreError::Malformed { .. })));
        assert!(matches!(store.get(keys[0]), Err(StoreError::NotFound(_))), "nothing stored");
        store.put_many(&[(keys[0], &small), (keys[1], &large)], true).unwrap();
        assert_eq!((store.get(keys[0]).unwrap(), store.get(keys[1]).unwrap()), (small.into(), large.into()));
    }

    #[test]
    fn put_get_corrupt_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let block = |i: u32, len: usize| {
            let data: Vec<u8> = (0..len).map(|b| (b as u32 * 5 + i) as u8).collect();
            cairn_block::Codec::plain().encode(cairn_block::BlockId { slice: 1, index: i }, &data)
        };
        // One block of each kind in the same bucket: a row of the database and a file.
        let (small, large) = (BlockKey { slice: 0x1234, index: 2 }, BlockKey { slice: 0x2234, index: 0 });
        let (a, b) = (block(0, 11), block(1, SMALL_MAX + 1));
        store.put(small, &a, true).unwrap();
        store.put(large, &b, false).unwrap();
        assert!(!store.path_of(small).exists() && store.path_of(large).exists());
        assert_eq!(store.get(small).unwrap(), a);
        assert_eq!(store.get(large).unwrap(), b);
        store.sync(&[small, large]).unwrap();
        assert!(matches!(store.put(small, b"garbage", false), Err(StoreError::Malformed { .. })));
        std::fs::write(store.dir_of(small).join(".tmp-0000000000001234-7-0"), b"partial").unwrap();
        assert_eq!(store.bucket_blocks(0x34).unwrap(), vec![small, large]);
        assert!(store.bucket_blocks(0x35).unwrap().is_empty());

        corrupt_row(dir.path(), small);
        assert_eq!(store.get(small).unwrap_err().code(), ErrorCode::Corrupt);
        let path = store.path_of(large);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(store.get(large).unwrap_err().code(), ErrorCode::Corrupt);

        store.delete(&[small, large, small]).unwrap();
        for key in [small, large] {
            assert_eq!(store.get(key).unwrap_err().code(), ErrorCode::NotFound);
            assert!(matches!(store.sync(&[key]), Err(StoreError::NotFound(_))));
        }
        assert!(store.bucket_blocks(0x34).unwrap().is_empty());
    }

    #[test]
    fn small_blocks_outlive_the_store_that_wrote_them() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<BlockKey> = (0..50).map(|i| BlockKey { slice: 300 + i, index: 0 }).collect();
        let block = |key: BlockKey| {
            cairn_block::Codec::plain()
                .encode(cairn_block::BlockId { slice: key.slice, index: 0 }, &[key.slice as u8; 900])
        };
        {
            let store = BlockStore::open(dir.path()).unwrap();
            for key in &keys {
                store.put(*key, &block(*key), false).unwrap();
            }
            store.sync(&keys).unwrap();
            store.delete(&keys[..10]).unwrap();
        }
        let store = BlockStore::open(dir.path()).unwrap();
        for key in &keys[10..] {
            assert_eq!(store.get(*key).unwrap(), block(*key));
        }
        assert_eq!(store.get(keys[0]).unwrap_err().code(), ErrorCode::NotFound);
        let listed: Vec<BlockKey> = (0..=255u8).flat_map(|b| store.bucket_blocks(b).unwrap()).collect();
        assert_eq!(listed.len(), 40);
    }

    #[test]
    fn large_blocks_are_stored_exactly_through_the_direct_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        // Sizes around the O_DIRECT threshold and sector alignment, each stored twice so the
        // staging buffer is reused with a shorter block after a longer one.
        for (i, len) in
            [DIRECT_MIN - 1, (1 << 20) + 3, DIRECT_MIN, SMALL_MAX + 5 * DIRECT_ALIGN].into_iter().enumerate()
        {
            let data: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
            let block = cairn_block::Codec::plain().encode(cairn_block::BlockId { slice: 9, index: i as u32 }, &data);
            for sync in [false, true] {
                let key = BlockKey { slice: 9, index: i as u32 };
                store.put(key, &block, sync).unwrap();
                assert_eq!(std::fs::metadata(store.path_of(key)).unwrap().len(), block.len() as u64);
                assert_eq!(store.get(key).unwrap(), block);
            }
        }
    }

    #[test]
    fn deleted_block_files_are_reused_for_new_blocks() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let block = |i: u32, len: usize| {
            let data: Vec<u8> = (0..len).map(|b| (b as u32 * 3 + i) as u8).collect();
            cairn_block::Codec::plain().encode(cairn_block::BlockId { slice: 5, index: i }, &data)
        };
        let (old, new) = (BlockKey { slice: 5, index: 0 }, BlockKey { slice: 6, index: 1 });
        store.put(old, &block(0, SMALL_MAX + 10), false).unwrap();
        let ino = std::fs::metadata(store.path_of(old)).unwrap().ino();
        store.delete(&[old]).unwrap();
        assert_eq!(store.get(old).unwrap_err().code(), ErrorCode::NotFound);
        assert_eq!(store.spares.len(), 1);
        // The next block, large enough for the O_DIRECT path, takes the emptied file.
        let big = block(1, DIRECT_MIN + 10);
        store.put(new, &big, true).unwrap();
        assert_eq!(std::fs::metadata(store.path_of(new)).unwrap().ino(), ino, "the spare inode was reused");
        assert_eq!(store.spares.len(), 0);
        assert_eq!(store.get(new).unwrap(), big);
        assert_eq!(store.bucket_blocks(6).unwrap(), vec![new]);

        // Reopened: empty spares are kept; a name left for a file that holds data (a crash
        // between the moves) is dropped, and the data with it never becomes a spare.
        store.delete(&[new]).unwrap();
        std::fs::write(dir.path().join("blocks/spare/leftover"), b"data").unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        assert_eq!(store.spares.len(), 1);
        assert!(!dir.path().join("blocks/spare/leftover").exists());
    }
}
