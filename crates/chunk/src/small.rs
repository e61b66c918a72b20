//! Small blocks in one SQLite database, `<data>/blocks/small.db`, instead of a file each.
//!
//! A block file costs the chunk server an inode: creating it (on ext4 without a journal, a
//! scan over every inode freed lately, see `spares`), opening it to read, and a random disk
//! read of its inode before its data once it is cold. Most blocks of a source tree are a
//! few KiB, and `git clone` or `tar x` of one made a chunk server spend more CPU on file
//! creation than on everything else it did. In the database, a small block is a row: the
//! rows of a tree written together lie together on disk, reading them cold back in order
//! (`tar c`, `git status`) is a nearly sequential read of one file, and a deleted row's
//! space is reused by the next ones.
//!
//! Durability follows the block files' rules: a `put` without `sync` is written (to the
//! write-ahead log) but not flushed, one with `sync` or a later [`SmallBlocks::sync`]
//! flushes the log, and whatever it holds then survives a crash.

use crate::store::StoreError;
use cairn_proto::chunk::BlockKey;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Blocks shorter than this (encoded, as stored) are rows of the database; longer ones are
/// files, where a large read or write is one system call and `O_DIRECT` saves the copies.
pub(crate) const SMALL_MAX: usize = 64 << 10;

/// The database of small blocks of one chunk server.
#[derive(Debug)]
pub(crate) struct SmallBlocks {
    path: PathBuf,
    /// The one connection that writes: SQLite takes one writer at a time anyway.
    writer: Mutex<Connection>,
    /// Read-only connections kept for reuse; WAL mode lets them read while a write goes on.
    readers: Mutex<Vec<Connection>>,
}

impl SmallBlocks {
    /// Opens (creating if needed) `<root>/small.db`.
    pub(crate) fn open(root: &Path) -> rusqlite::Result<SmallBlocks> {
        let path = root.join("small.db");
        let writer = Connection::open(&path)?;
        // WAL: readers go on while a block is written, and a commit is one append to the log.
        writer.pragma_update(None, "journal_mode", "WAL")?;
        writer.pragma_update(None, "synchronous", "NORMAL")?;
        writer.busy_timeout(std::time::Duration::from_secs(10))?;
        writer.execute_batch(
            "CREATE TABLE IF NOT EXISTS blocks (
                 slice INTEGER NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL,
                 PRIMARY KEY (slice, idx));
             CREATE INDEX IF NOT EXISTS blocks_by_bucket ON blocks ((slice & 255), slice, idx);",
        )?;
        Ok(SmallBlocks { path, writer: Mutex::new(writer), readers: Mutex::new(Vec::new()) })
    }

    /// Stores each block under its key (replacing an earlier copy), in one transaction; with
    /// `sync`, they are on disk when this returns, and so is every block stored before.
    pub(crate) fn put(&self, blocks: &[(BlockKey, &[u8])], sync: bool) -> Result<(), StoreError> {
        let mut w = self.writer.lock().expect("small blocks writer lock");
        let tx = w.transaction()?;
        {
            let mut insert =
                tx.prepare_cached("INSERT OR REPLACE INTO blocks (slice, idx, data) VALUES (?1, ?2, ?3)")?;
            for (key, block) in blocks {
                insert.execute(params![key.slice as i64, key.index, block])?;
            }
        }
        tx.commit()?;
        drop(w);
        if sync {
            self.sync()?;
        }
        Ok(())
    }

    /// Makes every block stored so far durable: the write-ahead log holds each one that is not
    /// in the main file yet, and SQLite syncs the main file at each checkpoint.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        match std::fs::File::open(&wal) {
            Ok(f) => f.sync_data(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::File::open(&self.path)?.sync_data(),
            Err(e) => Err(e),
        }
    }

    /// The block stored under `key`, if this database has it.
    pub(crate) fn get(&self, key: BlockKey) -> rusqlite::Result<Option<Vec<u8>>> {
        self.read(|c| {
            c.prepare_cached("SELECT data FROM blocks WHERE slice = ?1 AND idx = ?2")?
                .query_row(params![key.slice as i64, key.index], |r| r.get(0))
                .optional()
        })
    }

    /// Whether the database has a block under `key`.
    pub(crate) fn contains(&self, key: BlockKey) -> rusqlite::Result<bool> {
        self.read(|c| {
            c.prepare_cached("SELECT 1 FROM blocks WHERE slice = ?1 AND idx = ?2")?
                .query_row(params![key.slice as i64, key.index], |_| Ok(()))
                .optional()
                .map(|r| r.is_some())
        })
    }

    /// Deletes the blocks of `keys` this database has, in one transaction; returns the others.
    pub(crate) fn delete(&self, keys: &[BlockKey]) -> rusqlite::Result<Vec<BlockKey>> {
        let mut w = self.writer.lock().expect("small blocks writer lock");
        let tx = w.transaction()?;
        let mut elsewhere = Vec::new();
        {
            let mut del = tx.prepare_cached("DELETE FROM blocks WHERE slice = ?1 AND idx = ?2")?;
            for key in keys {
                if del.execute(params![key.slice as i64, key.index])? == 0 {
                    elsewhere.push(*key);
                }
            }
        }
        tx.commit()?;
        Ok(elsewhere)
    }

    /// The keys of the blocks of bucket `bucket` (slice id modulo 256) in this database.
    pub(crate) fn bucket(&self, bucket: u8) -> rusqlite::Result<Vec<BlockKey>> {
        self.read(|c| {
            let mut q = c.prepare_cached("SELECT slice, idx FROM blocks WHERE (slice & 255) = ?1")?;
            let rows = q.query_map([i64::from(bucket)], |r| {
                Ok(BlockKey { slice: r.get::<_, i64>(0)? as u64, index: r.get(1)? })
            })?;
            rows.collect()
        })
    }

    /// Runs `f` on a read-only connection taken from the pool (opened if none is free).
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        let pooled = self.readers.lock().expect("small blocks readers lock").pop();
        let conn = match pooled {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.busy_timeout(std::time::Duration::from_secs(10))?;
                c
            }
        };
        let out = f(&conn);
        self.readers.lock().expect("small blocks readers lock").push(conn);
        out
    }
}
