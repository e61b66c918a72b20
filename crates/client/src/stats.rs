//! Counters of the requests this client sends, by kind, so a user (and a benchmark) can see
//! which work reaches the network and which the caches absorb. `cairn stats <mountpoint>`
//! reads them through an ioctl on the mount.

use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Requests sent since the mount started, keyed by server (`meta`, `chunk`) and kind.
#[derive(Default)]
pub(crate) struct Stats {
    counts: DashMap<(&'static str, &'static str), AtomicU64>,
}

impl Stats {
    /// Counts one request of `kind` to a `server`.
    pub(crate) fn count(&self, server: &'static str, kind: &'static str) {
        self.add(server, kind, 1);
    }

    /// Counts `n` events of `kind` under `server`.
    pub(crate) fn add(&self, server: &'static str, kind: &'static str, n: u64) {
        let kind = (server, kind);
        if let Some(c) = self.counts.get(&kind) {
            c.fetch_add(n, Ordering::Relaxed);
            return;
        }
        self.counts.entry(kind).or_default().fetch_add(n, Ordering::Relaxed);
    }

    /// `server.kind count` lines, sorted.
    pub(crate) fn report(&self) -> String {
        let mut rows: Vec<_> = self.counts.iter().map(|e| (*e.key(), e.value().load(Ordering::Relaxed))).collect();
        rows.sort();
        rows.iter().map(|(k, n)| format!("{}.{} {n}\n", k.0, k.1)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_kind_in_sorted_lines() {
        let s = Stats::default();
        for (server, kind) in [("meta", "Lookup"), ("chunk", "Get"), ("meta", "Lookup")] {
            s.count(server, kind);
        }
        assert_eq!(s.report(), "chunk.Get 1\nmeta.Lookup 2\n");
    }
}
