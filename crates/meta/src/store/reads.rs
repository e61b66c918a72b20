//! Typed reads. Each is one statement (one round trip to SQLite); the service passes the
//! read pool, or the writer connection when the answer decides what a batch will write.

use super::Child;
use super::rows::{INODE_COLUMNS, attr_from_row, child_from_row, inode_columns_of, servers_from_text, slice_ref};
use crate::error::{MetaError, Result};
use cairn_proto::*;
use sqlx::{Row, SqliteExecutor};

/// Files up to this size get their first chunk's map in a readdirplus page and in the answer
/// to a commit.
pub(crate) const SMALL_FILE_MAP: u64 = 1 << 20;

fn not_found(msg: impl Into<String>) -> MetaError {
    MetaError::fs(ErrorCode::NotFound, msg)
}

pub(crate) async fn volume_setting<'e>(ex: impl SqliteExecutor<'e>, key: &str) -> Result<Option<String>> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT value FROM volume WHERE key = ?").bind(key).fetch_optional(ex).await?;
    Ok(row.map(|(v,)| v))
}

pub(crate) async fn volume<'e>(ex: impl SqliteExecutor<'e>) -> Result<VolumeInfo> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT key, value FROM volume").fetch_all(ex).await?;
    let get = |k: &str| rows.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let num = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok());
    match (get("name"), get("uuid"), num("chunk_size"), num("block_size"), num("replication")) {
        (Some(name), Some(uuid), Some(chunk_size), Some(block_size), Some(replication)) => Ok(VolumeInfo {
            name,
            uuid,
            chunk_size,
            block_size,
            replication: replication as u32,
            // Volumes formatted before blocks were compressed and encrypted have neither.
            compression: get("compression").and_then(|v| v.parse().ok()).unwrap_or(0),
            encrypted: get("encrypted").is_some_and(|v| v == "true"),
        }),
        _ => Err(MetaError::fs(ErrorCode::Invalid, "database holds no formatted volume (run `cairn format`)")),
    }
}

/// An inode's attributes, `ENOENT` if it does not exist.
pub(crate) async fn get_attr<'e>(ex: impl SqliteExecutor<'e>, ino: Ino) -> Result<Attr> {
    let row = sqlx::query(&format!("SELECT {INODE_COLUMNS} FROM inodes WHERE ino = ?"))
        .bind(ino as i64)
        .fetch_optional(ex)
        .await?;
    match row {
        Some(row) => attr_from_row(&row),
        None => Err(not_found(format!("no inode {ino}"))),
    }
}

/// The current write lease epoch of `ino` (see `Batch::new_lease_epoch`).
pub(crate) async fn lease_epoch<'e>(ex: impl SqliteExecutor<'e>, ino: Ino) -> Result<u64> {
    let row = sqlx::query("SELECT lease FROM inodes WHERE ino = ?").bind(ino as i64).fetch_optional(ex).await?;
    match row {
        Some(row) => Ok(row.try_get::<i64, _>("lease")? as u64),
        None => Err(not_found(format!("no inode {ino}"))),
    }
}

/// The attributes of `name` in `parent` (`None` if no such name), `ENOENT` if the parent
/// does not exist. One statement for what a lookup needs.
pub(crate) async fn lookup<'e>(ex: impl SqliteExecutor<'e>, parent: Ino, name: &[u8]) -> Result<Option<Attr>> {
    let row = sqlx::query(&format!(
        "SELECT p.ino AS parent_ino, {} FROM inodes p LEFT JOIN dentries d ON d.parent = p.ino AND d.name = ? \
         LEFT JOIN inodes i ON i.ino = d.ino WHERE p.ino = ?",
        inode_columns_of("i")
    ))
    .bind(name)
    .bind(parent as i64)
    .fetch_optional(ex)
    .await?;
    let Some(row) = row else { return Err(not_found(format!("no directory {parent}"))) };
    if row.try_get::<Option<i64>, _>("ino")?.is_none() {
        return Ok(None);
    }
    attr_from_row(&row).map(Some)
}

/// A directory's attributes and what `name` in it is (`None` if nothing), `ENOENT` if the
/// directory does not exist. One statement for what unlink, rmdir, rename and link check.
pub(crate) async fn entry<'e>(ex: impl SqliteExecutor<'e>, parent: Ino, name: &[u8]) -> Result<(Attr, Option<Child>)> {
    let row = sqlx::query(&format!(
        "SELECT {}, d.ino AS child, d.kind AS child_kind, \
         NOT EXISTS (SELECT 1 FROM dentries c WHERE c.parent = d.ino) AS child_empty, \
         (SELECT flags FROM inodes c WHERE c.ino = d.ino) AS child_flags \
         FROM inodes p LEFT JOIN dentries d ON d.parent = p.ino AND d.name = ? WHERE p.ino = ?",
        inode_columns_of("p")
    ))
    .bind(name)
    .bind(parent as i64)
    .fetch_optional(ex)
    .await?;
    let Some(row) = row else { return Err(not_found(format!("no directory {parent}"))) };
    Ok((attr_from_row(&row)?, child_from_row(&row)?))
}

/// The directory holding directory `ino`, `None` if `ino` does not exist.
pub(crate) async fn parent_of<'e>(ex: impl SqliteExecutor<'e>, ino: Ino) -> Result<Option<Ino>> {
    let row: Option<(i64,)> =
        sqlx::query_as("SELECT parent FROM inodes WHERE ino = ?").bind(ino as i64).fetch_optional(ex).await?;
    Ok(row.map(|(p,)| p as u64))
}

/// A symlink's target; `None` if `ino` is not a symlink, `ENOENT` if it does not exist.
pub(crate) async fn symlink_target<'e>(ex: impl SqliteExecutor<'e>, ino: Ino) -> Result<Option<Vec<u8>>> {
    let row: Option<(i64, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT kind, target FROM inodes WHERE ino = ?").bind(ino as i64).fetch_optional(ex).await?;
    match row {
        None => Err(not_found("no such inode")),
        Some((kind, target)) => Ok(target.filter(|_| kind == FileKind::Symlink.to_i64())),
    }
}

/// Up to `limit` entries of directory `ino` after cookie `after`, with attributes if `plus`,
/// and then also the first chunk's map of each small file (see `DirEntry::first_map`).
///
/// The page comes back as one JSON row: sqlx hands every row from SQLite's worker thread to
/// the runtime separately, and a thread wake-up per entry made a page of 1,024 entries cost
/// tens of milliseconds.
pub(crate) async fn dir_entries<'e>(
    ex: impl SqliteExecutor<'e>,
    ino: Ino,
    after: u64,
    limit: i64,
    plus: bool,
) -> Result<Vec<DirEntry>> {
    let (attr, map) = if plus {
        (
            "json_array(i.kind, i.perm, i.nlink, i.uid, i.gid, i.rdev, i.size, i.atime_s, i.atime_ns, i.mtime_s, \
             i.mtime_ns, i.ctime_s, i.ctime_ns, i.crtime_s, i.crtime_ns, i.xattrs, i.stored, i.flags)"
                .to_string(),
            format!(
                "CASE WHEN i.kind = {} AND i.size BETWEEN 1 AND {SMALL_FILE_MAP} THEN \
                 (SELECT json_group_array(json_array(s.pos, s.len, s.slice, s.servers) ORDER BY s.seq) \
                  FROM slices s WHERE s.ino = i.ino AND s.chunk = 0) END",
                FileKind::File.to_i64()
            ),
        )
    } else {
        ("NULL".to_string(), "NULL".to_string())
    };
    let (page,): (Option<String>,) = sqlx::query_as(&format!(
        "SELECT json_group_array(json_array(cookie, hex(name), ino, kind, json(a), json(m)) ORDER BY cookie) FROM \
         (SELECT d.cookie, d.name, d.ino, d.kind, {attr} AS a, {map} AS m FROM dentries d \
          JOIN inodes i ON i.ino = d.ino WHERE d.parent = ? AND d.cookie > ? ORDER BY d.cookie LIMIT ?)"
    ))
    .bind(ino as i64)
    .bind(after as i64)
    .bind(limit)
    .fetch_one(ex)
    .await?;
    type Row = (i64, String, i64, i64, Option<[i64; 18]>, Option<Vec<(i64, i64, i64, String)>>);
    let bad = |what: String| MetaError::fs(ErrorCode::Io, format!("bad directory page from the database: {what}"));
    let rows: Vec<Row> = serde_json::from_str(page.as_deref().unwrap_or("[]")).map_err(|e| bad(e.to_string()))?;
    rows.into_iter()
        .map(|(cookie, name, ino, kind, a, m)| {
            let kind = FileKind::from_i64(kind).ok_or_else(|| bad(format!("file kind {kind}")))?;
            let ts = |s: i64, n: i64| Timestamp { secs: s, nanos: n as u32 };
            let attr = a.map(|a| Attr {
                ino: ino as u64,
                kind,
                perm: a[1] as u32,
                nlink: a[2] as u32,
                uid: a[3] as u32,
                gid: a[4] as u32,
                rdev: a[5] as u32,
                size: a[6] as u64,
                atime: ts(a[7], a[8]),
                mtime: ts(a[9], a[10]),
                ctime: ts(a[11], a[12]),
                crtime: ts(a[13], a[14]),
                has_xattrs: a[15] != 0,
                stored: a[16] as u64,
                flags: a[17] as u32,
            });
            let first_map = m.map(|slices| {
                slices.iter().map(|(pos, len, id, servers)| slice_ref(*pos, *len, *id, servers)).collect()
            });
            Ok(DirEntry {
                name: hex::decode(&name).map_err(|e| bad(e.to_string()))?,
                ino: ino as u64,
                kind,
                cookie: cookie as u64,
                attr,
                first_map,
            })
        })
        .collect()
}

/// An inode's attributes and, for a non-empty file, chunk 0's slices in commit order: what an
/// open returns, read in one statement so no commit can come between the two.
pub(crate) async fn open_view<'e>(ex: impl SqliteExecutor<'e>, ino: Ino) -> Result<(Attr, Option<Vec<SliceRef>>)> {
    let rows = sqlx::query(&format!(
        "SELECT {}, s.pos, s.len, s.slice, s.servers FROM inodes i \
         LEFT JOIN slices s ON s.ino = i.ino AND s.chunk = 0 WHERE i.ino = ? ORDER BY s.seq",
        inode_columns_of("i")
    ))
    .bind(ino as i64)
    .fetch_all(ex)
    .await?;
    let Some(first) = rows.first() else { return Err(not_found(format!("no inode {ino}"))) };
    let attr = attr_from_row(first)?;
    if attr.kind != FileKind::File || attr.size == 0 {
        return Ok((attr, None));
    }
    let mut map = Vec::with_capacity(rows.len());
    for row in &rows {
        let Some(id) = row.try_get::<Option<i64>, _>("slice")? else { continue };
        map.push(slice_ref(row.try_get("pos")?, row.try_get("len")?, id, row.try_get("servers")?));
    }
    Ok((attr, Some(map)))
}

/// A chunk's slices in commit order and the newest one's `seq` (0 if none).
pub(crate) async fn slices<'e>(ex: impl SqliteExecutor<'e>, ino: Ino, chunk: u64) -> Result<(Vec<SliceRef>, u64)> {
    let rows: Vec<(i64, i64, i64, String, i64)> =
        sqlx::query_as("SELECT pos, len, slice, servers, seq FROM slices WHERE ino = ? AND chunk = ? ORDER BY seq")
            .bind(ino as i64)
            .bind(chunk as i64)
            .fetch_all(ex)
            .await?;
    let seq = rows.last().map_or(0, |r| r.4 as u64);
    let slices = rows.into_iter().map(|(pos, len, id, servers, _)| slice_ref(pos, len, id, &servers)).collect();
    Ok((slices, seq))
}

/// Among a chunk's slices overlapping `[pos, end)`: the newest `seq`, and whether the row at
/// `seq` still exists and lies wholly inside the range (what `Compact` must know, in one call).
pub(crate) async fn overlapping<'e>(
    ex: impl SqliteExecutor<'e>,
    ino: Ino,
    chunk: u64,
    seq: u64,
    pos: u64,
    end: u64,
) -> Result<(Option<u64>, bool)> {
    let (newest, at_seq): (Option<i64>, Option<bool>) = sqlx::query_as(
        "SELECT MAX(seq), MAX(seq = ? AND pos >= ? AND pos + len <= ?) FROM slices \
         WHERE ino = ? AND chunk = ? AND pos < ? AND pos + len > ?",
    )
    .bind(seq as i64)
    .bind(pos as i64)
    .bind(end as i64)
    .bind(ino as i64)
    .bind(chunk as i64)
    .bind(end as i64)
    .bind(pos as i64)
    .fetch_one(ex)
    .await?;
    Ok((newest.map(|n| n as u64), at_seq.unwrap_or(false)))
}

pub(crate) async fn xattr<'e>(ex: impl SqliteExecutor<'e>, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>> {
    let row: Option<(Vec<u8>,)> = sqlx::query_as("SELECT value FROM xattrs WHERE ino = ? AND name = ?")
        .bind(ino as i64)
        .bind(name)
        .fetch_optional(ex)
        .await?;
    Ok(row.map(|(v,)| v))
}

pub(crate) async fn xattr_names<'e>(ex: impl SqliteExecutor<'e>, ino: Ino) -> Result<Vec<Vec<u8>>> {
    let rows: Vec<(Vec<u8>,)> =
        sqlx::query_as("SELECT name FROM xattrs WHERE ino = ? ORDER BY name").bind(ino as i64).fetch_all(ex).await?;
    Ok(rows.into_iter().map(|(n,)| n).collect())
}

/// Up to `limit` unreferenced slices waiting for their blocks to be deleted: `(slice, len, servers)`.
pub(crate) async fn gc_queue<'e>(
    ex: impl SqliteExecutor<'e>,
    limit: i64,
) -> Result<Vec<(SliceId, u64, Vec<ServerId>)>> {
    let rows: Vec<(i64, i64, String)> =
        sqlx::query_as("SELECT slice, len, servers FROM gc_slices LIMIT ?").bind(limit).fetch_all(ex).await?;
    Ok(rows.into_iter().map(|(s, len, servers)| (s as u64, len as u64, servers_from_text(&servers))).collect())
}

/// How many slices wait in the deletion queue (`cairn gc`).
pub(crate) async fn gc_queued<'e>(ex: impl SqliteExecutor<'e>) -> Result<u64> {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM gc_slices").fetch_one(ex).await?;
    Ok(n as u64)
}

/// Slice rows after `after_seq` in `seq` order, at most `limit`: `(seq, slice, len,
/// servers)`, for the re-replication scan.
pub(crate) async fn slice_holders<'e>(
    ex: impl SqliteExecutor<'e>,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<(i64, SliceId, u64, Vec<ServerId>)>> {
    let rows: Vec<(i64, i64, i64, String)> =
        sqlx::query_as("SELECT seq, slice, len, servers FROM slices WHERE seq > ? AND slice != 0 ORDER BY seq LIMIT ?")
            .bind(after_seq)
            .bind(limit)
            .fetch_all(ex)
            .await?;
    Ok(rows.into_iter().map(|(q, s, len, servers)| (q, s as u64, len as u64, servers_from_text(&servers))).collect())
}

/// Inodes with no link left (freed at start: their open handles died with the last run).
pub(crate) async fn unlinked_inodes<'e>(ex: impl SqliteExecutor<'e>) -> Result<Vec<Ino>> {
    let rows: Vec<(i64,)> = sqlx::query_as("SELECT ino FROM inodes WHERE nlink = 0").fetch_all(ex).await?;
    Ok(rows.into_iter().map(|(i,)| i as u64).collect())
}

/// Which of `inos` have no link left, in one statement.
pub(crate) async fn unlinked_among<'e>(ex: impl SqliteExecutor<'e>, inos: &[Ino]) -> Result<Vec<Ino>> {
    let list = inos.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let rows: Vec<(i64,)> =
        sqlx::query_as("SELECT ino FROM inodes WHERE nlink = 0 AND ino IN (SELECT value FROM json_each(?))")
            .bind(format!("[{list}]"))
            .fetch_all(ex)
            .await?;
    Ok(rows.into_iter().map(|(i,)| i as u64).collect())
}

pub(crate) async fn inode_count<'e>(ex: impl SqliteExecutor<'e>) -> Result<u64> {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM inodes").fetch_one(ex).await?;
    Ok(n as u64)
}

/// The chunk servers recorded for `slice` (all rows together), or None if no file
/// references it.
pub(crate) async fn slice_servers<'e>(ex: impl SqliteExecutor<'e>, slice: SliceId) -> Result<Option<Vec<ServerId>>> {
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT DISTINCT servers FROM slices WHERE slice = ?").bind(slice as i64).fetch_all(ex).await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut servers: Vec<ServerId> = rows.iter().flat_map(|(t,)| servers_from_text(t)).collect();
    servers.sort();
    servers.dedup();
    Ok(Some(servers))
}

/// Which of `slices` some file references with a copy on `server` (reconciliation keeps
/// those and drops the rest).
pub(crate) async fn held_on<'e>(
    ex: impl SqliteExecutor<'e>,
    server: ServerId,
    slices: &[SliceId],
) -> Result<std::collections::HashSet<SliceId>> {
    let list = slices.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT DISTINCT slice, servers FROM slices WHERE slice IN (SELECT value FROM json_each(?))")
            .bind(format!("[{list}]"))
            .fetch_all(ex)
            .await?;
    Ok(rows.into_iter().filter(|(_, t)| servers_from_text(t).contains(&server)).map(|(s, _)| s as u64).collect())
}

/// The consistency checks of `cairn fsck`: each returns one row of text per problem. Kinds
/// are `FileKind` as integers (0 file, 1 directory).
const FSCK_CHECKS: &[&str] = &[
    "SELECT printf('entry %s in directory %d points to missing inode %d', quote(d.name), d.parent, d.ino)
     FROM dentries d LEFT JOIN inodes i ON i.ino = d.ino WHERE i.ino IS NULL",
    "SELECT printf('entry %s (inode %d) is in %d, which is not a directory', quote(d.name), d.ino, d.parent)
     FROM dentries d LEFT JOIN inodes p ON p.ino = d.parent WHERE p.ino IS NULL OR p.kind != 1",
    "SELECT printf('entry %s in directory %d has kind %d, but inode %d has kind %d', quote(d.name), d.parent,
                   d.kind, i.ino, i.kind)
     FROM dentries d JOIN inodes i ON i.ino = d.ino WHERE d.kind != i.kind",
    "SELECT printf('inode %d has nlink %d, but %d entries name it', ino, nlink, links) FROM
       (SELECT i.ino, i.nlink, (SELECT COUNT(*) FROM dentries d WHERE d.ino = i.ino) AS links
        FROM inodes i WHERE i.kind != 1)
     WHERE nlink != links",
    "SELECT printf('directory %d has nlink %d, but %d subdirectories', ino, nlink, subdirs) FROM
       (SELECT i.ino, i.nlink, (SELECT COUNT(*) FROM dentries d WHERE d.parent = i.ino AND d.kind = 1) AS subdirs
        FROM inodes i WHERE i.kind = 1 AND i.nlink > 0)
     WHERE nlink != 2 + subdirs",
    "SELECT printf('directory %d has %d entries naming it', ino, links) FROM
       (SELECT i.ino, (SELECT COUNT(*) FROM dentries d WHERE d.ino = i.ino) AS links
        FROM inodes i WHERE i.kind = 1 AND i.nlink > 0)
     WHERE links != (CASE WHEN ino = 1 THEN 0 ELSE 1 END)",
    "SELECT printf('directory %d records parent %d, but its entry is in %d', i.ino, i.parent, d.parent)
     FROM inodes i JOIN dentries d ON d.ino = i.ino WHERE i.kind = 1 AND i.parent != d.parent",
    "WITH RECURSIVE reach(ino) AS
       (SELECT 1 UNION SELECT d.ino FROM dentries d JOIN reach r ON d.parent = r.ino WHERE d.kind = 1)
     SELECT printf('directory %d is not reachable from the root', i.ino)
     FROM inodes i WHERE i.kind = 1 AND i.nlink > 0 AND i.ino NOT IN (SELECT ino FROM reach)",
    "SELECT printf('slices of inode %d, which is missing or not a file', s.ino)
     FROM (SELECT DISTINCT ino FROM slices) s LEFT JOIN inodes i ON i.ino = s.ino
     WHERE i.ino IS NULL OR i.kind != 0",
    "SELECT printf('slice %d of inode %d has no recorded copy', slice, ino)
     FROM slices WHERE slice != 0 AND servers = ''",
    "SELECT printf('the slice counter (%d) is not above slice %d: ids (nonces) could be reused', c.value, m.s)
     FROM counters c, (SELECT MAX(s) AS s FROM (SELECT MAX(slice) AS s FROM slices
                                                UNION ALL SELECT MAX(slice) FROM gc_slices)) m
     WHERE c.name = 'next_slice' AND m.s IS NOT NULL AND c.value <= m.s",
];

/// Every inconsistency the `cairn fsck` checks find, one line each, and the table sizes
/// `(inodes, dentries, slice rows)`, all from one snapshot of a live database.
pub(crate) async fn fsck(pool: &sqlx::SqlitePool) -> Result<(Vec<String>, (u64, u64, u64))> {
    let mut tx = pool.begin().await?;
    let (i, d, s): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM inodes), (SELECT COUNT(*) FROM dentries), (SELECT COUNT(*) FROM slices)",
    )
    .fetch_one(&mut *tx)
    .await?;
    let mut problems = Vec::new();
    for check in FSCK_CHECKS {
        let rows: Vec<(String,)> = sqlx::query_as(check).fetch_all(&mut *tx).await?;
        problems.extend(rows.into_iter().map(|(p,)| p));
    }
    Ok((problems, (i as u64, d as u64, s as u64)))
}
