//! The statements a [`Batch`] can hold, one method per kind of change.

use super::Batch;
use super::rows::{INODE_COLUMNS, servers_to_text};
use cairn_proto::meta::SetAttrs;
use cairn_proto::*;

/// Slice rows per INSERT statement (6 values each, well under SQLite's bind limit).
const SLICES_PER_INSERT: usize = 1000;

impl Batch {
    pub(crate) fn set_volume_setting(&mut self, key: &str, value: String) {
        self.push(
            "INSERT INTO volume (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key.to_string())
        .bind(value);
    }

    /// Adds an inode; its number comes back through [`super::Returned::ino`] and is what a
    /// following [`Batch::insert_dentry_for_new_inode`] links.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn insert_inode(
        &mut self,
        ino: Option<Ino>,
        kind: FileKind,
        perm: u32,
        nlink: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        parent: Ino,
        target: Option<Vec<u8>>,
        now: Timestamp,
    ) {
        if let Some(ino) = ino {
            self.changes(ino);
        }
        self.push(
            "INSERT INTO inodes (ino, kind, perm, nlink, uid, gid, rdev, size, atime_s, atime_ns, mtime_s, \
             mtime_ns, ctime_s, ctime_ns, crtime_s, crtime_ns, parent, target) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING ino AS new_ino",
        )
        .bind(ino.map(|i| i as i64))
        .bind(kind.to_i64())
        .bind(perm as i64)
        .bind(nlink as i64)
        .bind(uid as i64)
        .bind(gid as i64)
        .bind(rdev as i64)
        .bind(target.as_ref().map_or(0, |t| t.len() as i64))
        .bind_ts(now)
        .bind_ts(now)
        .bind_ts(now)
        .bind_ts(now)
        .bind_ino(parent)
        .bind(target);
    }

    /// Links the inode inserted just before in this batch as `name` in `parent`.
    pub(crate) fn insert_dentry_for_new_inode(&mut self, parent: Ino, name: &[u8], kind: FileKind) {
        self.push("INSERT INTO dentries (parent, name, ino, kind) VALUES (?, ?, last_insert_rowid(), ?)")
            .bind_ino(parent)
            .bind(name.to_vec())
            .bind(kind.to_i64());
    }

    pub(crate) fn insert_dentry(&mut self, parent: Ino, name: &[u8], ino: Ino, kind: FileKind) {
        self.push("INSERT INTO dentries (parent, name, ino, kind) VALUES (?, ?, ?, ?)")
            .bind_ino(parent)
            .bind(name.to_vec())
            .bind_ino(ino)
            .bind(kind.to_i64());
    }

    /// Renames an entry in place, so it keeps its readdir cookie: a listing in progress never
    /// meets a renamed entry twice.
    pub(crate) fn move_dentry(&mut self, parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8]) {
        self.push("UPDATE dentries SET parent = ?, name = ? WHERE parent = ? AND name = ?")
            .bind_ino(new_parent)
            .bind(new_name.to_vec())
            .bind_ino(parent)
            .bind(name.to_vec());
    }

    /// Points an existing entry at another inode, keeping its cookie (RENAME_EXCHANGE).
    pub(crate) fn retarget_dentry(&mut self, parent: Ino, name: &[u8], ino: Ino, kind: FileKind) {
        self.push("UPDATE dentries SET ino = ?, kind = ? WHERE parent = ? AND name = ?")
            .bind_ino(ino)
            .bind(kind.to_i64())
            .bind_ino(parent)
            .bind(name.to_vec());
    }

    pub(crate) fn delete_dentry(&mut self, parent: Ino, name: &[u8]) {
        self.push("DELETE FROM dentries WHERE parent = ? AND name = ?").bind_ino(parent).bind(name.to_vec());
    }

    /// Marks directory `ino` changed (mtime, ctime) and adjusts its link count.
    /// The directory's new attributes come back through [`super::Returned::touched_dirs`].
    pub(crate) fn touch_dir(&mut self, ino: Ino, nlink_delta: i64, now: Timestamp) {
        self.changed.push((ino, true));
        self.push(&format!(
            "UPDATE inodes SET nlink = nlink + ?, mtime_s = ?, mtime_ns = ?, ctime_s = ?, ctime_ns = ? WHERE ino = ? \
             RETURNING {INODE_COLUMNS}, 1 AS touched_dir"
        ))
        .bind(nlink_delta)
        .bind_ts(now)
        .bind_ts(now)
        .bind_ino(ino);
    }

    pub(crate) fn touch_ctime(&mut self, ino: Ino, now: Timestamp) {
        self.changes(ino);
        self.push("UPDATE inodes SET ctime_s = ?, ctime_ns = ? WHERE ino = ?").bind_ts(now).bind_ino(ino);
    }

    /// Sets atime after a read access.
    pub(crate) fn touch_atime(&mut self, ino: Ino, atime: Timestamp) {
        self.changes(ino);
        self.push("UPDATE inodes SET atime_s = ?, atime_ns = ? WHERE ino = ?").bind_ts(atime).bind_ino(ino);
    }

    /// Records that directory `ino` now lives in `parent`.
    pub(crate) fn set_parent(&mut self, ino: Ino, parent: Ino) {
        self.changes(ino);
        self.push("UPDATE inodes SET parent = ? WHERE ino = ?").bind_ino(parent).bind_ino(ino);
    }

    /// Drops one link of `ino` (all of them for a directory); inodes left with none come back
    /// through [`super::Returned::unlinked`].
    pub(crate) fn drop_link(&mut self, ino: Ino, is_dir: bool, now: Timestamp) {
        self.changes(ino);
        self.push(
            "UPDATE inodes SET nlink = CASE WHEN ? THEN 0 ELSE MAX(nlink - 1, 0) END, ctime_s = ?, ctime_ns = ? \
             WHERE ino = ? RETURNING ino AS dropped_ino, nlink AS left",
        )
        .bind(is_dir)
        .bind_ts(now)
        .bind_ino(ino);
    }

    /// Adds one link to `ino`.
    pub(crate) fn add_link(&mut self, ino: Ino, now: Timestamp) {
        self.changes(ino);
        self.push("UPDATE inodes SET nlink = nlink + 1, ctime_s = ?, ctime_ns = ? WHERE ino = ?")
            .bind_ts(now)
            .bind_ino(ino);
    }

    /// Writes every attribute column of `a` back.
    pub(crate) fn put_attr(&mut self, a: &Attr) {
        self.changes(a.ino);
        self.push(
            "UPDATE inodes SET perm = ?, nlink = ?, uid = ?, gid = ?, rdev = ?, size = ?, atime_s = ?, \
             atime_ns = ?, mtime_s = ?, mtime_ns = ?, ctime_s = ?, ctime_ns = ?, flags = ? WHERE ino = ?",
        )
        .bind(a.perm as i64)
        .bind(a.nlink as i64)
        .bind(a.uid as i64)
        .bind(a.gid as i64)
        .bind(a.rdev as i64)
        .bind(a.size as i64)
        .bind_ts(a.atime)
        .bind_ts(a.mtime)
        .bind_ts(a.ctime)
        .bind(a.flags as i64)
        .bind_ino(a.ino);
    }

    /// Appends written slices to regular file `ino` and grows it to at least `min_size`;
    /// slices set its mtime and ctime to `now`, then `attrs` (mode, owner, mtime) apply as a
    /// `SetAttr` would. The new attributes come back through [`super::Returned::attr`];
    /// nothing changes (and no attributes come back) unless `ino` is a regular file under
    /// write lease `lease` and not immutable, nor, with `attrs`, append-only or with xattrs
    /// (a chmod must rewrite its ACL).
    pub(crate) fn commit_slices(
        &mut self,
        ino: Ino,
        slices: &[NewSlice],
        min_size: u64,
        lease: u64,
        now: Timestamp,
        attrs: Option<&SetAttrs>,
    ) {
        self.changes(ino);
        let may = match attrs {
            Some(_) => format!("flags & {} = 0 AND xattrs = 0", inode_flags::LOCKED),
            None => format!("flags & {} = 0", inode_flags::IMMUTABLE),
        };
        let touched = !slices.is_empty();
        let added: u64 = slices.iter().map(|s| u64::from(s.slice.len)).sum();
        let mtime = match attrs.and_then(|a| a.mtime) {
            Some(TimeSet::At(t)) => Some(t),
            Some(TimeSet::Now) => Some(Timestamp::now()),
            None => touched.then_some(now),
        };
        let ctime = attrs.map(|a| a.ctime.unwrap_or_else(Timestamp::now)).or(touched.then_some(now));
        let perm = attrs.and_then(|a| a.perm).map(|p| i64::from(p & 0o7777));
        self.push(&format!(
            "UPDATE inodes SET size = MAX(size, ?), stored = stored + ?, perm = COALESCE(?, perm), \
             uid = COALESCE(?, uid), gid = COALESCE(?, gid), \
             mtime_s = CASE WHEN ? THEN ? ELSE mtime_s END, mtime_ns = CASE WHEN ? THEN ? ELSE mtime_ns END, \
             ctime_s = CASE WHEN ? THEN ? ELSE ctime_s END, ctime_ns = CASE WHEN ? THEN ? ELSE ctime_ns END \
             WHERE ino = ? AND kind = ? AND {may} AND lease = ? RETURNING {INODE_COLUMNS}"
        ))
        .bind(min_size as i64)
        .bind(added as i64)
        .bind(perm)
        .bind(attrs.and_then(|a| a.uid).map(i64::from))
        .bind(attrs.and_then(|a| a.gid).map(i64::from));
        for t in [mtime, ctime] {
            let at = t.unwrap_or(now);
            self.bind(t.is_some()).bind(at.secs).bind(t.is_some()).bind(at.nanos as i64);
        }
        self.bind_ino(ino).bind(FileKind::File.to_i64()).bind(lease as i64);
        for part in slices.chunks(SLICES_PER_INSERT) {
            let values = vec!["(?, ?, ?, ?, ?, ?)"; part.len()].join(", ");
            self.push(&format!(
                "INSERT INTO slices (ino, chunk, pos, len, slice, servers) SELECT * FROM (VALUES {values}) \
                 WHERE EXISTS (SELECT 1 FROM inodes WHERE ino = ? AND kind = ? AND {may} AND lease = ?)"
            ));
            for s in part {
                self.bind_ino(ino)
                    .bind(s.chunk as i64)
                    .bind(s.slice.pos as i64)
                    .bind(s.slice.len as i64)
                    .bind(s.slice.id as i64)
                    .bind(servers_to_text(&s.slice.servers));
            }
            self.bind_ino(ino).bind(FileKind::File.to_i64()).bind(lease as i64);
        }
    }

    /// One commit (see `MetaService::commit_in`): [`Batch::commit_slices`], then
    /// [`Batch::first_map_of_small`], whose one row ends the commit's rows (see
    /// [`super::Returned::split_commits`]).
    pub(crate) fn commit(&mut self, ino: Ino, c: &crate::data::Commit<'_>, attrs: Option<&SetAttrs>) {
        self.commit_slices(ino, c.slices, c.min_size, c.lease, c.written_at, attrs);
        self.first_map_of_small(ino);
    }

    /// Reads back chunk 0's map of a file of at most `SMALL_FILE_MAP` bytes, after the
    /// batch's earlier statements (see [`super::Returned::first_map`]): the answer to a commit
    /// then tells the client what an open would.
    pub(crate) fn first_map_of_small(&mut self, ino: Ino) {
        self.push(&format!(
            "SELECT CASE WHEN (SELECT size FROM inodes WHERE ino = ?) BETWEEN 1 AND {} THEN \
             json_group_array(json_array(pos, len, slice, servers) ORDER BY seq) END AS first_map \
             FROM slices WHERE ino = ? AND chunk = 0",
            super::reads::SMALL_FILE_MAP
        ))
        .bind_ino(ino)
        .bind_ino(ino);
    }

    /// Starts a new write lease epoch on a file: commits under the previous one are refused
    /// from now on. Returns the file's columns and the new epoch as `value`.
    /// `floor` is the lowest epoch of this start of the server (see `MetaService::lease_floor`).
    pub(crate) fn new_lease_epoch(&mut self, ino: Ino, floor: u64) {
        self.changes(ino);
        self.push(&format!(
            "UPDATE inodes SET lease = MAX(lease + 1, ?) WHERE ino = ? AND kind = ? \
             RETURNING {INODE_COLUMNS}, lease AS value"
        ))
        .bind(floor as i64)
        .bind_ino(ino)
        .bind(FileKind::File.to_i64());
    }

    /// Ends whatever write lease epoch a file has (another client changed its data).
    pub(crate) fn bump_lease(&mut self, ino: Ino, floor: u64) {
        self.changes(ino);
        self.push("UPDATE inodes SET lease = MAX(lease + 1, ?) WHERE ino = ?").bind(floor as i64).bind_ino(ino);
    }

    /// Ends write lease `epoch` of a file whose holder did not answer a recall, unless a
    /// newer one was granted meanwhile.
    pub(crate) fn revoke_lease(&mut self, ino: Ino, epoch: u64) {
        self.changes(ino);
        self.push("UPDATE inodes SET lease = lease + 1 WHERE ino = ? AND lease = ?").bind_ino(ino).bind(epoch as i64);
    }

    /// Counts `len` more bytes as stored for `ino` (an allocation: `st_blocks` must not grow
    /// when the allocated range is written later).
    pub(crate) fn add_stored(&mut self, ino: Ino, len: u64) {
        self.changes(ino);
        self.push("UPDATE inodes SET stored = stored + ? WHERE ino = ?").bind(len as i64).bind_ino(ino);
    }

    /// Makes `[pos, pos + len)` of one chunk read as zeros.
    pub(crate) fn insert_hole(&mut self, ino: Ino, chunk: u64, pos: u32, len: u32) {
        self.push("INSERT INTO slices (ino, chunk, pos, len, slice, servers) VALUES (?, ?, ?, ?, ?, '')")
            .bind_ino(ino)
            .bind(chunk as i64)
            .bind(pos as i64)
            .bind(len as i64)
            .bind(HOLE_SLICE as i64);
    }

    /// Deletes the slice rows of chunks `>= from_chunk` and queues their slices for block
    /// deletion: a slice belongs to one chunk of one file, so none is referenced any more.
    pub(crate) fn drop_slices(&mut self, ino: Ino, from_chunk: u64) {
        self.changes(ino);
        self.push(
            "UPDATE inodes SET stored = stored - \
             (SELECT total(len) FROM slices WHERE ino = ? AND chunk >= ? AND slice != 0) WHERE ino = ?",
        )
        .bind_ino(ino)
        .bind(from_chunk as i64)
        .bind_ino(ino);
        self.push(
            "INSERT OR IGNORE INTO gc_slices (slice, len, servers) \
             SELECT slice, len, servers FROM slices WHERE ino = ? AND chunk >= ? AND slice != 0",
        )
        .bind_ino(ino)
        .bind(from_chunk as i64);
        self.push("DELETE FROM slices WHERE ino = ? AND chunk >= ?").bind_ino(ino).bind(from_chunk as i64);
    }

    /// Replaces the rows of a chunk that lie inside `slice`'s range and are not newer than
    /// `seq` by `slice` (see `MetaRequest::Compact`); their slices are queued for GC. With
    /// `at_seq`, the new row takes position `seq` (whose row is among those replaced), so
    /// rows committed since keep shadowing it; otherwise it goes on top.
    pub(crate) fn compact_slices(&mut self, ino: Ino, chunk: u64, seq: u64, slice: &SliceRef, at_seq: bool) {
        self.changes(ino);
        let (pos, end) = (slice.pos as i64, slice.pos as i64 + slice.len as i64);
        let inside = "ino = ? AND chunk = ? AND seq <= ? AND pos >= ? AND pos + len <= ?";
        self.push(&format!(
            "UPDATE inodes SET stored = stored + ? - \
             (SELECT total(len) FROM slices WHERE {inside} AND slice != 0) WHERE ino = ?"
        ))
        .bind(slice.len as i64)
        .bind_ino(ino)
        .bind(chunk as i64)
        .bind(seq as i64)
        .bind(pos)
        .bind(end)
        .bind_ino(ino);
        self.push(&format!(
            "INSERT OR IGNORE INTO gc_slices (slice, len, servers) \
             SELECT slice, len, servers FROM slices WHERE {inside} AND slice != 0"
        ))
        .bind_ino(ino)
        .bind(chunk as i64)
        .bind(seq as i64)
        .bind(pos)
        .bind(end);
        self.push(&format!("DELETE FROM slices WHERE {inside}"))
            .bind_ino(ino)
            .bind(chunk as i64)
            .bind(seq as i64)
            .bind(pos)
            .bind(end);
        self.push("INSERT INTO slices (seq, ino, chunk, pos, len, slice, servers) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(at_seq.then_some(seq as i64))
            .bind_ino(ino)
            .bind(chunk as i64)
            .bind(pos)
            .bind(slice.len as i64)
            .bind(slice.id as i64)
            .bind(servers_to_text(&slice.servers));
    }

    /// Removes an inode with its xattrs and data (queued for GC).
    pub(crate) fn purge_inode(&mut self, ino: Ino) {
        self.changes(ino);
        self.drop_slices(ino, 0);
        self.push("DELETE FROM xattrs WHERE ino = ?").bind_ino(ino);
        self.push("DELETE FROM inodes WHERE ino = ?").bind_ino(ino);
    }

    pub(crate) fn set_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8], now: Timestamp) {
        self.changes(ino);
        self.push("INSERT OR REPLACE INTO xattrs (ino, name, value) VALUES (?, ?, ?)")
            .bind_ino(ino)
            .bind(name.to_vec())
            .bind(value.to_vec());
        self.push("UPDATE inodes SET xattrs = 1, ctime_s = ?, ctime_ns = ? WHERE ino = ?").bind_ts(now).bind_ino(ino);
    }

    /// Sets an xattr of the inode just linked as `name` in `parent` in this batch (inherited
    /// ACLs).
    pub(crate) fn set_xattr_of_new_entry(&mut self, parent: Ino, name: &[u8], xattr: &[u8], value: &[u8]) {
        // The inode is named, not numbered: forget every cached attribute.
        self.changes_unknown = true;
        self.push(
            "INSERT INTO xattrs (ino, name, value) \
             SELECT ino, ?, ? FROM dentries WHERE parent = ? AND name = ?",
        )
        .bind(xattr.to_vec())
        .bind(value.to_vec())
        .bind_ino(parent)
        .bind(name.to_vec());
        self.push("UPDATE inodes SET xattrs = 1 WHERE ino = (SELECT ino FROM dentries WHERE parent = ? AND name = ?)")
            .bind_ino(parent)
            .bind(name.to_vec());
    }

    pub(crate) fn remove_xattr(&mut self, ino: Ino, name: &[u8], now: Timestamp) {
        self.changes(ino);
        self.push("DELETE FROM xattrs WHERE ino = ? AND name = ?").bind_ino(ino).bind(name.to_vec());
        self.push(
            "UPDATE inodes SET xattrs = EXISTS (SELECT 1 FROM xattrs WHERE ino = ?), ctime_s = ?, ctime_ns = ? \
             WHERE ino = ?",
        )
        .bind_ino(ino)
        .bind_ts(now)
        .bind_ino(ino);
    }

    /// Reserves `count` slice ids; the first comes back through [`super::Returned::value`].
    pub(crate) fn alloc_slices(&mut self, count: u64) {
        self.push("UPDATE counters SET value = value + ? WHERE name = 'next_slice' RETURNING value - ? AS value")
            .bind(count as i64)
            .bind(count as i64);
    }

    /// Counts a start of the metadata server; the new count comes back through
    /// [`super::Returned::value`].
    pub(crate) fn count_boot(&mut self) {
        self.push("UPDATE counters SET value = value + 1 WHERE name = 'boot' RETURNING value");
    }

    /// Reserves `count` inode numbers; the first comes back through [`super::Returned::value`].
    pub(crate) fn reserve_inodes(&mut self, count: u64) {
        self.push("UPDATE sqlite_sequence SET seq = seq + ? WHERE name = 'inodes' RETURNING seq - ? + 1 AS value")
            .bind(count as i64)
            .bind(count as i64);
    }

    /// Records which servers hold a slice's blocks (after re-replication).
    pub(crate) fn set_slice_servers(&mut self, slice: SliceId, servers: &[ServerId]) {
        self.push("UPDATE slices SET servers = ? WHERE slice = ?").bind(servers_to_text(servers)).bind(slice as i64);
    }

    /// Takes slices whose blocks are deleted off the GC queue.
    pub(crate) fn gc_done(&mut self, slices: &[SliceId]) {
        for part in slices.chunks(SLICES_PER_INSERT) {
            let marks = vec!["?"; part.len()].join(", ");
            self.push(&format!("DELETE FROM gc_slices WHERE slice IN ({marks})"));
            for s in part {
                self.bind(*s as i64);
            }
        }
    }

    /// A write that changes nothing, so a durable batch has something to commit.
    pub(crate) fn barrier(&mut self) {
        self.push("UPDATE counters SET value = value WHERE name = 'next_slice'");
    }
}
