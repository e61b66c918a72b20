//! Directory attributes held by the writer connection, so that a create, mkdir, symlink or
//! mknod checks its parent without a database round trip: each statement sent to SQLite costs
//! two thread wake-ups, far more than SQLite's own work (see the module doc of `store`).
//!
//! The cache is exact, not a hint. Every write goes through the one writer connection, which
//! the cache lives in; a batch forgets every inode it changes before it runs (so one cut
//! short leaves nothing stale), and afterwards remembers only the rows its own `RETURNING`
//! gave back, for directories no later statement of the batch changed.

use cairn_proto::{Attr, FileKind, Ino};
use std::collections::HashMap;

/// Directories remembered at most; the cache is emptied when it would grow past this.
const MAX_DIRS: usize = 65_536;

#[derive(Default)]
pub(crate) struct DirAttrs(HashMap<Ino, Attr>);

impl DirAttrs {
    pub(crate) fn get(&self, ino: Ino) -> Option<Attr> {
        self.0.get(&ino).cloned()
    }

    /// Remembers `a` as the database holds it now; only directories are kept.
    pub(crate) fn remember(&mut self, a: Attr) {
        if a.kind != FileKind::Dir {
            return;
        }
        if self.0.len() >= MAX_DIRS && !self.0.contains_key(&a.ino) {
            self.0.clear();
        }
        self.0.insert(a.ino, a);
    }

    /// Forgets `inos`, or everything with `all`.
    pub(crate) fn forget(&mut self, inos: impl Iterator<Item = Ino>, all: bool) {
        if all {
            self.0.clear();
        }
        for ino in inos {
            self.0.remove(&ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ino: Ino, kind: FileKind) -> Attr {
        Attr { ino, kind, ..Attr::default() }
    }

    #[test]
    fn keeps_directories_only_and_forgets_on_demand() {
        let mut c = DirAttrs::default();
        c.remember(attr(1, FileKind::Dir));
        c.remember(attr(2, FileKind::File));
        assert!(c.get(1).is_some());
        assert!(c.get(2).is_none(), "files are not kept");
        c.forget([1].into_iter(), false);
        assert!(c.get(1).is_none());
        c.remember(attr(3, FileKind::Dir));
        c.forget(std::iter::empty(), true);
        assert!(c.get(3).is_none());
    }
}
