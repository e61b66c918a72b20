//! The optional on-disk block cache: blocks exactly as the chunk servers store them
//! (compressed, encrypted and checksummed), so nothing lands on the client's disk in plain
//! text, and every block read back is verified as one from the network would be. Blocks never
//! change (a slice id is never reused), so nothing here is ever invalidated; the cache is only
//! bounded, least recently used first. What an earlier mount left is indexed again at start.

use cairn_proto::chunk::BlockKey;
use moka::notification::RemovalCause;
use std::path::{Path, PathBuf};

/// Blocks on local disk, bounded in bytes.
pub(crate) struct DiskCache {
    dir: PathBuf,
    /// Every cached block and its size; evicting an entry deletes its file.
    index: moka::sync::Cache<BlockKey, u32>,
}

impl DiskCache {
    /// Opens (creating it if needed) a cache of at most `bytes` in `dir`.
    pub(crate) fn open(dir: &Path, bytes: u64) -> std::io::Result<DiskCache> {
        std::fs::create_dir_all(dir)?;
        let files = dir.to_path_buf();
        let index = moka::sync::Cache::builder()
            .max_capacity(bytes)
            .weigher(|_, len: &u32| *len)
            .eviction_listener(move |key: std::sync::Arc<BlockKey>, _, cause| {
                if cause != RemovalCause::Replaced {
                    let _ = std::fs::remove_file(files.join(file_name(*key)));
                }
            })
            .build();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            match parse_name(&name.to_string_lossy()) {
                Some(key) => index.insert(key, entry.metadata()?.len().min(u32::MAX as u64) as u32),
                // Half-written files of a mount that died.
                None => drop(std::fs::remove_file(entry.path())),
            }
        }
        index.run_pending_tasks();
        Ok(DiskCache { dir: dir.to_path_buf(), index })
    }

    /// The stored bytes of `key`, if cached.
    pub(crate) async fn get(&self, key: BlockKey) -> Option<Vec<u8>> {
        self.index.get(&key)?;
        match tokio::fs::read(self.dir.join(file_name(key))).await {
            Ok(bytes) => Some(bytes),
            Err(_) => {
                self.index.invalidate(&key);
                None
            }
        }
    }

    /// Keeps `bytes` (a block as fetched from a chunk server) for later reads, in the
    /// background. A failure (a full disk) only means the block is not cached.
    pub(crate) fn put(&self, key: BlockKey, bytes: Vec<u8>) {
        let (path, tmp) = (self.dir.join(file_name(key)), self.dir.join(format!(".tmp-{}", file_name(key))));
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || {
            let len = bytes.len() as u32;
            match std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, &path)) {
                Ok(()) => index.insert(key, len),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    tracing::debug!(?key, "cannot keep a block on disk: {e}");
                }
            }
        });
    }

    /// Drops a cached block that failed verification.
    pub(crate) fn remove(&self, key: BlockKey) {
        self.index.invalidate(&key);
    }
}

fn file_name(key: BlockKey) -> String {
    format!("{:016x}-{}", key.slice, key.index)
}

fn parse_name(name: &str) -> Option<BlockKey> {
    let (slice, index) = name.split_once('-')?;
    Some(BlockKey { slice: u64::from_str_radix(slice, 16).ok()?, index: index.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_blocks_across_opens_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let key = |slice| BlockKey { slice, index: 1 };
        let cache = DiskCache::open(dir.path(), 10_000).unwrap();
        for slice in 0..3 {
            cache.put(key(slice), vec![slice as u8; 4000]);
        }
        // Writes happen in the background.
        for _ in 0..100 {
            cache.index.run_pending_tasks();
            if std::fs::read_dir(dir.path()).unwrap().count() == 2 && cache.index.entry_count() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(cache.index.entry_count(), 2, "3 blocks of 4000 bytes in 10,000");
        let kept: Vec<u64> = (0..3).filter(|s| cache.index.contains_key(&key(*s))).collect();
        assert_eq!(kept.len(), 2);
        assert_eq!(cache.get(key(kept[0])).await, Some(vec![kept[0] as u8; 4000]));
        drop(cache);
        std::fs::write(dir.path().join(".tmp-0000000000000009-1"), b"half").unwrap();
        let again = DiskCache::open(dir.path(), 10_000).unwrap();
        assert_eq!(again.get(key(kept[1])).await, Some(vec![kept[1] as u8; 4000]), "indexed again");
        assert!(!dir.path().join(".tmp-0000000000000009-1").exists(), "half-written files go");
        again.remove(key(kept[1]));
        again.index.run_pending_tasks();
        assert!(again.get(key(kept[1])).await.is_none());
        assert!(!dir.path().join(file_name(key(kept[1]))).exists());
    }
}
