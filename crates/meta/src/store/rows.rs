//! Turning SQL rows into protocol types.

use crate::error::{MetaError, Result};
use cairn_proto::*;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

/// The `inodes` columns [`attr_from_row`] reads, in order.
pub(crate) const INODE_COLUMNS: &str = "ino, kind, perm, nlink, uid, gid, rdev, size, atime_s, atime_ns, \
     mtime_s, mtime_ns, ctime_s, ctime_ns, crtime_s, crtime_ns, xattrs, stored, flags";

/// [`INODE_COLUMNS`] qualified with a table alias, for joins.
pub(crate) fn inode_columns_of(alias: &str) -> String {
    INODE_COLUMNS.split(", ").map(|c| format!("{alias}.{c}")).collect::<Vec<_>>().join(", ")
}

fn kind_of(v: i64) -> Result<FileKind> {
    FileKind::from_i64(v).ok_or_else(|| MetaError::fs(ErrorCode::Io, format!("bad file kind {v} in the database")))
}

pub(crate) fn attr_from_row(row: &SqliteRow) -> Result<Attr> {
    let ts = |s: &str, n: &str| -> Result<Timestamp> {
        Ok(Timestamp { secs: row.try_get(s)?, nanos: row.try_get::<i64, _>(n)? as u32 })
    };
    Ok(Attr {
        ino: row.try_get::<i64, _>("ino")? as u64,
        kind: kind_of(row.try_get("kind")?)?,
        perm: row.try_get::<i64, _>("perm")? as u32,
        nlink: row.try_get::<i64, _>("nlink")? as u32,
        uid: row.try_get::<i64, _>("uid")? as u32,
        gid: row.try_get::<i64, _>("gid")? as u32,
        rdev: row.try_get::<i64, _>("rdev")? as u32,
        size: row.try_get::<i64, _>("size")? as u64,
        atime: ts("atime_s", "atime_ns")?,
        mtime: ts("mtime_s", "mtime_ns")?,
        ctime: ts("ctime_s", "ctime_ns")?,
        crtime: ts("crtime_s", "crtime_ns")?,
        has_xattrs: row.try_get::<i64, _>("xattrs")? != 0,
        stored: row.try_get::<i64, _>("stored")? as u64,
        flags: row.try_get::<i64, _>("flags")? as u32,
    })
}

/// A name found in a directory, as the mutating operations need to check it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Child {
    pub ino: Ino,
    pub kind: FileKind,
    /// For directories: whether it has no entries.
    pub empty: bool,
    /// Its `chattr` flags.
    pub flags: u32,
}

pub(crate) fn child_from_row(row: &SqliteRow) -> Result<Option<Child>> {
    let Some(ino) = row.try_get::<Option<i64>, _>("child")? else { return Ok(None) };
    Ok(Some(Child {
        ino: ino as u64,
        kind: kind_of(row.try_get("child_kind")?)?,
        empty: row.try_get::<i64, _>("child_empty")? != 0,
        flags: row.try_get::<i64, _>("child_flags")? as u32,
    }))
}

/// What the `RETURNING` clauses of a batch gave back.
pub(crate) struct Returned(pub(crate) Vec<SqliteRow>);

impl Returned {
    /// The inode number a `RETURNING ino` statement gave (the first one).
    pub(crate) fn ino(&self) -> Result<Ino> {
        let row = self.0.iter().find(|r| r.try_get::<i64, _>("new_ino").is_ok());
        let row = row.ok_or_else(|| MetaError::fs(ErrorCode::Io, "the database returned no inode number"))?;
        Ok(row.try_get::<i64, _>("new_ino")? as u64)
    }

    /// The inodes whose link count dropped to zero in this batch.
    pub(crate) fn unlinked(&self) -> Vec<Ino> {
        self.0
            .iter()
            .filter_map(|r| Some((r.try_get::<i64, _>("dropped_ino").ok()?, r.try_get::<i64, _>("left").ok()?)))
            .filter(|(_, left)| *left == 0)
            .map(|(ino, _)| ino as u64)
            .collect()
    }

    /// The attributes a `RETURNING` of all inode columns gave, if any row matched (not
    /// counting [`Returned::touched_dirs`]).
    pub(crate) fn attr(&self) -> Result<Option<Attr>> {
        let touched = |r: &SqliteRow| r.try_get::<i64, _>("touched_dir").is_ok();
        self.0.iter().find(|r| r.try_get::<i64, _>("perm").is_ok() && !touched(r)).map(attr_from_row).transpose()
    }

    /// The map [`crate::store::Batch::first_map_of_small`] read, if the file was small.
    pub(crate) fn first_map(&self) -> Result<Option<Vec<SliceRef>>> {
        let Some(row) = self.0.iter().find(|r| is_first_map(r)) else {
            return Ok(None);
        };
        let Some(json) = row.try_get::<Option<String>, _>("first_map")? else { return Ok(None) };
        let rows: Vec<(i64, i64, i64, String)> = serde_json::from_str(&json)
            .map_err(|e| MetaError::fs(ErrorCode::Io, format!("bad chunk map from the database: {e}")))?;
        Ok(Some(rows.iter().map(|(pos, len, id, servers)| slice_ref(*pos, *len, *id, servers)).collect()))
    }

    /// The rows of a batch of several [`crate::store::Batch::commit`]s, split into each
    /// commit's: each ends with the one row of its `first_map_of_small`.
    pub(crate) fn split_commits(self) -> Vec<Returned> {
        let mut parts = vec![Returned(Vec::new())];
        for row in self.0 {
            let last = is_first_map(&row);
            parts.last_mut().expect("a part").0.push(row);
            if last {
                parts.push(Returned(Vec::new()));
            }
        }
        parts.pop();
        parts
    }

    /// The attributes `Batch::touch_dir` left directories with, in statement order.
    pub(crate) fn touched_dirs(&self) -> Result<Vec<Attr>> {
        self.0.iter().filter(|r| r.try_get::<i64, _>("touched_dir").is_ok()).map(attr_from_row).collect()
    }

    /// The single integer value a counter update returned.
    pub(crate) fn value(&self) -> Result<i64> {
        let row = self.0.iter().find(|r| r.try_get::<i64, _>("value").is_ok());
        let row = row.ok_or_else(|| MetaError::fs(ErrorCode::Io, "the database returned no value"))?;
        Ok(row.try_get::<i64, _>("value")?)
    }
}

/// Whether `row` is the one a `first_map_of_small` gives.
fn is_first_map(row: &SqliteRow) -> bool {
    row.try_get::<Option<String>, _>("first_map").is_ok()
}

pub(crate) fn servers_to_text(servers: &[ServerId]) -> String {
    servers.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",")
}

/// A slice as stored in a `slices` row.
pub(crate) fn slice_ref(pos: i64, len: i64, id: i64, servers: &str) -> SliceRef {
    SliceRef { pos: pos as u32, len: len as u32, id: id as u64, servers: servers_from_text(servers) }
}

pub(crate) fn servers_from_text(text: &str) -> Vec<ServerId> {
    text.split(',').filter_map(|s| s.parse().ok()).collect()
}
