//! Listing ahead of a tree walk. `tar c`, `find`, `du`, `cp -r` and `rm -r` list a directory,
//! then enter its subdirectories one by one, and the kernel lists each only once the walk is
//! inside it: one wait for the metadata server per directory. When a directory found in a
//! listing read lately is listed in turn (the walk went down), the next directories the walk
//! will enter — its own subdirectories, then its later siblings — are listed in the
//! background, and their listings (see `listing`) answer the kernel when it gets there.

use crate::Client;
use cairn_proto::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Directories listed ahead of a walk per directory it enters.
const AHEAD: usize = 8;
/// Listings fetched ahead at once, over all walks.
const IN_FLIGHT: usize = 4;
/// Subdirectories remembered from listings, over all directories.
const REMEMBERED: u64 = 100_000;

/// Where subdirectories were found (see the module doc).
pub(crate) struct Walks {
    /// A subdirectory → its parent's subdirectories in listing order, and its position there.
    found: moka::sync::Cache<Ino, (Arc<Vec<Ino>>, usize)>,
    fetches: Arc<Semaphore>,
}

impl Walks {
    pub(crate) fn new(ttl: Duration) -> Walks {
        Walks {
            found: moka::sync::Cache::builder().max_capacity(REMEMBERED).time_to_live(ttl).build(),
            fetches: Arc::new(Semaphore::new(IN_FLIGHT)),
        }
    }
}

impl Client {
    /// Notes the start of a listing of `dir` given to the kernel (`entries` in the order it
    /// gets them); if a walk went down into `dir`, lists the directories it enters next.
    pub(crate) fn walked(self: &Arc<Self>, dir: Ino, entries: &[DirEntry]) {
        let subdirs: Arc<Vec<Ino>> =
            Arc::new(entries.iter().filter(|e| e.kind == FileKind::Dir).map(|e| e.ino).collect());
        for (i, sub) in subdirs.iter().enumerate() {
            self.walks.found.insert(*sub, (subdirs.clone(), i));
        }
        let Some((siblings, at)) = self.walks.found.get(&dir) else { return };
        let next = subdirs.iter().chain(&siblings[at + 1..]).take(AHEAD);
        for &sub in next {
            let Ok(permit) = self.walks.fetches.clone().try_acquire_owned() else { return };
            if !self.claim_listing(sub) {
                continue;
            }
            self.stats.count("walk", "ahead");
            let client = self.clone();
            tokio::spawn(async move {
                client.list(sub).await;
                drop(permit);
            });
        }
    }
}
