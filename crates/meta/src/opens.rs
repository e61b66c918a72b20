//! Open handles per inode and per client connection, so an unlinked file lives until its last
//! close and a dead client's handles are dropped with its connection.

use cairn_proto::Ino;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// Counts of open handles, in memory (a restarted metadata server starts with none).
#[derive(Default)]
pub(crate) struct Opens {
    inner: Mutex<OpensInner>,
}

#[derive(Default)]
struct OpensInner {
    by_ino: HashMap<Ino, u32>,
    by_conn: HashMap<usize, HashMap<Ino, u32>>,
    /// Inodes without links kept alive by open handles: freed at their last close.
    orphans: HashSet<Ino>,
    /// Connections already dropped: an open of theirs still running when the connection
    /// ended must not register a handle nobody would close (one word per closed connection;
    /// connection ids are never reused).
    gone: HashSet<usize>,
}

impl Opens {
    /// Registers a handle of `conn` on `ino` (none if the connection ended already).
    pub(crate) fn open(&self, conn: usize, ino: Ino) {
        let mut g = self.inner.lock().expect("opens lock");
        if g.gone.contains(&conn) {
            return;
        }
        *g.by_ino.entry(ino).or_default() += 1;
        *g.by_conn.entry(conn).or_default().entry(ino).or_default() += 1;
    }

    /// Whether connection `conn` has `ino` open.
    pub(crate) fn holds(&self, conn: usize, ino: Ino) -> bool {
        let g = self.inner.lock().expect("opens lock");
        g.by_conn.get(&conn).is_some_and(|per_conn| per_conn.contains_key(&ino))
    }

    /// Notes that `ino` lost its last link; returns true if nothing has it open, so it can be
    /// freed now. Otherwise its last close frees it ([`Opens::close`]).
    pub(crate) fn unlinked(&self, ino: Ino) -> bool {
        let mut g = self.inner.lock().expect("opens lock");
        if g.by_ino.contains_key(&ino) {
            g.orphans.insert(ino);
            return false;
        }
        true
    }

    /// Drops one handle; returns true if it was the last of an inode without links, which
    /// must be freed now.
    pub(crate) fn close(&self, conn: usize, ino: Ino) -> bool {
        let mut g = self.inner.lock().expect("opens lock");
        if let Some(per_conn) = g.by_conn.get_mut(&conn) {
            match per_conn.get_mut(&ino) {
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    per_conn.remove(&ino);
                }
                None => return false,
            }
        } else {
            return false;
        }
        decrement(&mut g.by_ino, ino, 1) && g.orphans.remove(&ino)
    }

    /// Drops every handle of a connection; returns the inodes without links that lost their
    /// last handle, which must be freed now.
    pub(crate) fn drop_conn(&self, conn: usize) -> Vec<Ino> {
        let mut g = self.inner.lock().expect("opens lock");
        g.gone.insert(conn);
        let Some(per_conn) = g.by_conn.remove(&conn) else {
            return Vec::new();
        };
        let last: Vec<Ino> =
            per_conn.into_iter().filter(|(ino, n)| decrement(&mut g.by_ino, *ino, *n)).map(|(ino, _)| ino).collect();
        last.into_iter().filter(|ino| g.orphans.remove(ino)).collect()
    }
}

fn decrement(map: &mut HashMap<Ino, u32>, ino: Ino, by: u32) -> bool {
    match map.get_mut(&ino) {
        Some(n) if *n > by => {
            *n -= by;
            false
        }
        Some(_) => {
            map.remove(&ino);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orphans_are_freed_at_their_last_close_or_dead_connection() {
        let o = Opens::default();
        o.open(1, 10);
        o.open(2, 10);
        o.open(1, 10);
        assert!(!o.unlinked(10), "open: kept");
        assert!(!o.close(1, 10));
        assert!(!o.close(1, 10));
        assert_eq!(o.drop_conn(2), vec![10], "the last handle died with its connection");
        assert!(o.unlinked(10), "nothing has it open");
        assert!(!o.close(3, 10));
        o.open(1, 11);
        assert!(!o.close(1, 11), "a linked file is not freed at close");
        o.open(1, 12);
        assert!(!o.unlinked(12));
        assert!(o.close(1, 12));
    }

    #[test]
    fn an_open_that_ends_after_its_connection_registers_nothing() {
        let opens = Opens::default();
        opens.open(1, 10);
        assert_eq!(opens.drop_conn(1), Vec::<Ino>::new());
        opens.open(1, 10);
        assert!(!opens.holds(1, 10));
        assert!(opens.unlinked(10), "no handle keeps the file");
    }
}
