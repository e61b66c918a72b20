//! Emptied block files kept for reuse. Creating a file costs ext4 an inode allocation, which
//! on a filesystem without a journal steps over every inode freed in the last minutes
//! (`recently_deleted`, reading their inode table blocks): measured here, 3,000 creates of
//! 4 KiB files took 1.4–1.6 s of CPU, more than everything else a chunk server does for a small
//! block, against 0.22 s when each took an emptied file instead. So a deleted block is
//! truncated and moved into `<data>/blocks/spare/`, and a new block takes a file from there
//! when there is one: deleting stops freeing inodes, so creating stops stepping over them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Spare files kept at most; deleting beyond them unlinks.
const MAX_SPARES: usize = 8192;

/// The pool of spare files of one block directory.
#[derive(Debug)]
pub(crate) struct Spares {
    dir: PathBuf,
    files: Mutex<Vec<PathBuf>>,
    /// A spare was taken since the directory was last made durable.
    taken: AtomicBool,
}

impl Spares {
    /// Opens (creating) `<root>/spare` and takes stock of the files in it. After a crash a
    /// name may still be there for an inode that became a block since: only empty files with
    /// no other link are reused, other names are removed.
    pub(crate) fn open(root: &Path) -> std::io::Result<Spares> {
        let dir = root.join("spare");
        std::fs::create_dir_all(&dir)?;
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() && m.len() == 0 && m.nlink() == 1 && files.len() < MAX_SPARES => files.push(path),
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(Spares { dir, files: Mutex::new(files), taken: AtomicBool::new(false) })
    }

    /// Deletes the block file at `path`: empties it and moves it into the pool under `name`
    /// (unique: block keys are never reused), or unlinks it once the pool is full.
    pub(crate) fn recycle(&self, path: &Path, name: &str) -> std::io::Result<()> {
        if self.files.lock().expect("spares lock").len() >= MAX_SPARES {
            return std::fs::remove_file(path);
        }
        std::fs::OpenOptions::new().write(true).open(path)?.set_len(0)?;
        let spare = self.dir.join(name);
        if let Err(e) = std::fs::rename(path, &spare) {
            // Emptied, it is no block any more either way.
            return std::fs::remove_file(path).or(Err(e));
        }
        self.files.lock().expect("spares lock").push(spare);
        Ok(())
    }

    /// Moves a spare file to `to`, an unused name; false if there is none.
    pub(crate) fn take(&self, to: &Path) -> bool {
        loop {
            let Some(spare) = self.files.lock().expect("spares lock").pop() else {
                return false;
            };
            if std::fs::rename(&spare, to).is_ok() {
                self.taken.store(true, Ordering::Release);
                return true;
            }
        }
    }

    /// Makes the pool's directory durable if a spare was taken since it last was, so that a
    /// spare file taken for a block that is synced after this cannot reappear in the pool
    /// after a crash. (While no spare is in use, an fsync costs no extra directory sync.)
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        if !self.taken.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        std::fs::File::open(&self.dir)?.sync_all().inspect_err(|_| self.taken.store(true, Ordering::Release))
    }

    /// Spare files in the pool.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.files.lock().expect("spares lock").len()
    }
}
