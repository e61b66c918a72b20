//! Background scrub: reads every stored block at a bounded rate and verifies its checksum, so
//! a copy that rotted on disk is found and repaired from a good one before it is needed. Bad
//! slices (found here or by a client's read) go to the metadata server with the heartbeat.

use crate::store::{BlockStore, StoreError, off_thread};
use cairn_proto::SliceId;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Corrupt slices reported per heartbeat at most, so a heartbeat stays small.
const REPORT_MAX: usize = 1000;

/// Slices with a corrupt block here, not yet reported to the metadata server.
#[derive(Default, Clone)]
pub(crate) struct BadSlices(Arc<Mutex<BTreeSet<SliceId>>>);

impl BadSlices {
    pub(crate) fn add(&self, slice: SliceId) {
        self.0.lock().expect("bad slices lock").insert(slice);
    }

    /// What to report now (at most [`REPORT_MAX`]: the rest goes with later heartbeats);
    /// call [`BadSlices::reported`] once the metadata server has it.
    pub(crate) fn pending(&self) -> Vec<SliceId> {
        self.0.lock().expect("bad slices lock").iter().take(REPORT_MAX).copied().collect()
    }

    pub(crate) fn reported(&self, slices: &[SliceId]) {
        let mut set = self.0.lock().expect("bad slices lock");
        for s in slices {
            set.remove(s);
        }
    }
}

/// How fast and how often to scrub.
#[derive(Debug, Clone, Copy)]
pub struct ScrubConfig {
    /// Bytes read per second; 0 turns scrubbing off.
    pub bytes_per_sec: u64,
    /// From the start of one pass to the start of the next.
    pub interval: Duration,
}

/// Scrubs forever: one pass over every bucket, then a wait until the next is due. When the
/// last pass started is kept in `state` (unix seconds), so a restart does not begin a new
/// pass early; a new server's first pass comes one interval after it first starts.
pub(crate) async fn scrub_loop(store: BlockStore, bad: BadSlices, config: ScrubConfig, state: PathBuf) {
    if config.bytes_per_sec == 0 {
        return;
    }
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    // Synced, like everything in the data directory, so a power cut leaves no dirty page.
    let record = |t: u64| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&state)?;
        std::io::Write::write_all(&mut f, t.to_string().as_bytes())?;
        f.sync_all()
    };
    let last = std::fs::read_to_string(&state).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let last = last.unwrap_or_else(|| {
        let _ = record(now());
        now()
    });
    let since = Duration::from_secs(now().saturating_sub(last));
    tokio::time::sleep(config.interval.saturating_sub(since)).await;
    loop {
        let started = Instant::now();
        if let Err(e) = record(now()) {
            warn!("scrub: recording the pass start in {}: {e}", state.display());
        }
        let (mut blocks, mut bytes, mut corrupt) = (0u64, 0u64, 0u64);
        for bucket in 0..=255u8 {
            let s = store.clone();
            let keys = match off_thread(move || s.bucket_blocks(bucket)).await {
                Ok(k) => k,
                Err(e) => {
                    warn!("scrub: listing bucket {bucket:02x}: {e}");
                    continue;
                }
            };
            for key in keys {
                let t0 = Instant::now();
                let s = store.clone();
                let read = match off_thread(move || s.get(key)).await {
                    Ok(block) => block.len() as u64,
                    Err(StoreError::Corrupt { key, reason }) => {
                        error!(?key, "scrub: corrupt block: {reason}");
                        bad.add(key.slice);
                        corrupt += 1;
                        0
                    }
                    // Deleted since the listing (GC, reconciliation): nothing to check.
                    Err(StoreError::NotFound(_)) => 0,
                    Err(e) => {
                        warn!(?key, "scrub: {e}");
                        0
                    }
                };
                blocks += 1;
                bytes += read;
                // Sleep for as long as reading `read` bytes at the configured rate takes.
                let due = Duration::from_secs_f64(read as f64 / config.bytes_per_sec as f64);
                tokio::time::sleep(due.saturating_sub(t0.elapsed())).await;
            }
        }
        info!(blocks, bytes, corrupt, secs = started.elapsed().as_secs(), "scrub pass done");
        tokio::time::sleep(config.interval.saturating_sub(started.elapsed())).await;
    }
}
