//! Block files on disk: `<data>/blocks/<slice % 256 as hex>/<slice as hex>-<index>`.

use cairn_proto::chunk::BlockKey;
use cairn_proto::{ErrorCode, SliceId};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Blocks at least this large start their writeback as soon as they are written (see
/// [`start_writeback`]).
const WRITEBACK_MIN: usize = 256 << 10;

/// Asks the kernel to start writing a file's dirty pages now, without waiting. A large write
/// ends with an fsync; without this the page cache collects the whole file first and the
/// fsync then waits for all of it (1.2 s for 1 GiB here), while with it the disk works during
/// the write and the fsync finds little left to do. Only a hint: failures are ignored.
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
}

impl StoreError {
    /// The code reported to the caller.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::NotFound(_) => ErrorCode::NotFound,
            StoreError::Corrupt { .. } => ErrorCode::Corrupt,
            StoreError::Malformed { .. } => ErrorCode::BadRequest,
            StoreError::Io(e) => ErrorCode::from_errno(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
}

/// Runs blocking file work on tokio's blocking pool, off the server's one network thread.
pub(crate) async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Io(std::io::Error::other(e)))?
}

/// A directory of block files.
#[derive(Debug, Clone)]
pub struct BlockStore {
    root: PathBuf,
}

impl BlockStore {
    /// Opens (creating if needed) the block directory under `data_dir`.
    pub fn open(data_dir: &Path) -> std::io::Result<BlockStore> {
        let root = data_dir.join("blocks");
        std::fs::create_dir_all(&root)?;
        Ok(BlockStore { root })
    }

    fn dir_of(&self, key: BlockKey) -> PathBuf {
        self.root.join(format!("{:02x}", key.slice % 256))
    }

    fn path_of(&self, key: BlockKey) -> PathBuf {
        self.dir_of(key).join(format!("{:016x}-{}", key.slice, key.index))
    }

    /// Stores a block after checking its format; with `sync` it is on disk when this returns.
    pub fn put(&self, key: BlockKey, block: &[u8], sync: bool) -> Result<(), StoreError> {
        cairn_block::verify(block).map_err(|e| StoreError::Malformed { key, reason: e.to_string() })?;
        let dir = self.dir_of(key);
        std::fs::create_dir_all(&dir)?;
        let path = self.path_of(key);
        let tmp = dir.join(format!(".tmp-{:016x}-{}-{:08x}", key.slice, key.index, rand::random::<u32>()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(block)?;
            if sync {
                f.sync_data()?;
            } else if block.len() >= WRITEBACK_MIN {
                start_writeback(&f);
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
        let mut dirs = std::collections::BTreeSet::new();
        for key in keys {
            if let Err(e) = std::fs::symlink_metadata(self.path_of(*key)) {
                return Err(match e.kind() {
                    std::io::ErrorKind::NotFound => StoreError::NotFound(*key),
                    _ => e.into(),
                });
            }
            dirs.insert(self.dir_of(*key));
        }
        if keys.len() > SYNC_EACH_MAX {
            let root = std::fs::File::open(&self.root)?;
            // SAFETY: syncfs on a descriptor we own and keep open for the call.
            if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&root)) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            return Ok(());
        }
        for key in keys {
            std::fs::File::open(self.path_of(*key))?.sync_data()?;
        }
        for d in dirs {
            std::fs::File::open(d)?.sync_all()?;
        }
        Ok(())
    }

    /// Reads a block and verifies its checksum; a bad block is an error, never returned.
    pub fn get(&self, key: BlockKey) -> Result<Vec<u8>, StoreError> {
        let data = match std::fs::read(self.path_of(key)) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(key));
            }
            Err(e) => return Err(e.into()),
        };
        cairn_block::verify(&data).map_err(|e| StoreError::Corrupt { key, reason: e.to_string() })?;
        Ok(data)
    }

    /// Deletes blocks; missing ones are fine.
    pub fn delete(&self, keys: &[BlockKey]) -> Result<(), StoreError> {
        for key in keys {
            match std::fs::remove_file(self.path_of(*key)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The blocks stored in bucket `bucket` (slice id modulo 256), sorted; in-progress (`.tmp-`) files are skipped.
    pub fn bucket_blocks(&self, bucket: u8) -> Result<Vec<BlockKey>, StoreError> {
        let entries = match std::fs::read_dir(self.root.join(format!("{bucket:02x}"))) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut keys = Vec::new();
        for entry in entries {
            let name = entry?.file_name();
            let Some((slice, index)) = name.to_str().and_then(|n| n.split_once('-')) else { continue };
            if let (Ok(slice), Ok(index)) = (SliceId::from_str_radix(slice, 16), index.parse()) {
                keys.push(BlockKey { slice, index });
            }
        }
        keys.sort();
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

    #[test]
    fn put_get_corrupt_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let key = BlockKey { slice: 0x1234, index: 2 };
        let block = cairn_block::Codec::plain().encode(cairn_block::BlockId { slice: 1, index: 0 }, b"hello block");
        store.put(key, &block, true).unwrap();
        assert_eq!(store.get(key).unwrap(), block);
        assert!(matches!(store.put(key, b"garbage", false), Err(StoreError::Malformed { .. })));
        let path = store.path_of(key);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(store.get(key).unwrap_err().code(), ErrorCode::Corrupt);
        std::fs::write(store.dir_of(key).join(".tmp-0000000000001234-7-0"), b"partial").unwrap();
        assert_eq!(store.bucket_blocks(0x34).unwrap(), vec![key]);
        assert!(store.bucket_blocks(0x35).unwrap().is_empty());
        store.delete(&[key, key]).unwrap();
        assert_eq!(store.get(key).unwrap_err().code(), ErrorCode::NotFound);
    }
}
