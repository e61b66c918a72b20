//! The one module that talks SQL. Service logic calls these methods and never writes queries,
//! so another sqlx backend (PostgreSQL) can be added here without touching the rest.

use crate::error::{MetaError, Result};
use cairn_proto::*;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqliteConnection, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use tokio::sync::Mutex;

pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The metadata database: a read pool and one serialized writer connection.
pub struct Store {
    pub(crate) readers: SqlitePool,
    pub(crate) writer: Mutex<SqliteConnection>,
}

pub(crate) type Tx<'a> = sqlx::Transaction<'a, sqlx::Sqlite>;

pub(crate) const INODE_COLUMNS: &str = "ino, kind, perm, nlink, uid, gid, rdev, size, atime_s, atime_ns, \
     mtime_s, mtime_ns, ctime_s, ctime_ns, crtime_s, crtime_ns, xattrs";

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and applies migrations.
    pub async fn open(path: &Path) -> Result<Store> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(10))
            .pragma("cache_size", "-65536");
        let readers = SqlitePoolOptions::new().max_connections(4).connect_with(opts.clone()).await?;
        MIGRATOR.run(&readers).await?;
        let writer = sqlx::ConnectOptions::connect(&opts).await?;
        Ok(Store { readers, writer: Mutex::new(writer) })
    }

    /// Writes the volume settings and the root directory of a new volume.
    pub async fn format(&self, info: &VolumeInfo, root_uid: u32, root_gid: u32) -> Result<()> {
        let mut w = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        let existing: Option<(String,)> =
            sqlx::query_as("SELECT value FROM volume WHERE key = 'name'").fetch_optional(&mut *tx).await?;
        if let Some((name,)) = existing {
            return Err(MetaError::fs(ErrorCode::Exists, format!("database already holds volume {name:?}")));
        }
        for (k, v) in [
            ("name", info.name.clone()),
            ("uuid", info.uuid.clone()),
            ("chunk_size", info.chunk_size.to_string()),
            ("block_size", info.block_size.to_string()),
            ("replication", info.replication.to_string()),
        ] {
            sqlx::query("INSERT INTO volume (key, value) VALUES (?, ?)").bind(k).bind(v).execute(&mut *tx).await?;
        }
        let now = Timestamp::now();
        insert_inode(&mut tx, Some(ROOT_INO), FileKind::Dir, 0o755, 2, root_uid, root_gid, 0, ROOT_INO, None, now)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Reads the volume settings written by [`Store::format`].
    pub async fn volume(&self) -> Result<VolumeInfo> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT key, value FROM volume").fetch_all(&self.readers).await?;
        let get = |k: &str| rows.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let num = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok());
        match (get("name"), get("uuid"), num("chunk_size"), num("block_size"), num("replication")) {
            (Some(name), Some(uuid), Some(chunk_size), Some(block_size), Some(replication)) => {
                Ok(VolumeInfo { name, uuid, chunk_size, block_size, replication: replication as u32 })
            }
            _ => Err(MetaError::fs(ErrorCode::Invalid, "database holds no formatted volume (run `cairn format`)")),
        }
    }

    /// Starts a write transaction on the single writer connection.
    pub(crate) async fn write(&self) -> Result<WriteGuard<'_>> {
        Ok(WriteGuard { conn: self.writer.lock().await })
    }
}

/// Exclusive access to the writer connection; transactions begin from it.
pub(crate) struct WriteGuard<'a> {
    conn: tokio::sync::MutexGuard<'a, SqliteConnection>,
}

impl WriteGuard<'_> {
    pub(crate) async fn begin(&mut self) -> Result<Tx<'_>> {
        Ok(sqlx::Connection::begin(&mut *self.conn).await?)
    }

    /// Runs `PRAGMA synchronous` so the next commit is (or is not) fsynced to the WAL.
    pub(crate) async fn set_durable(&mut self, durable: bool) -> Result<()> {
        let mode = if durable { "FULL" } else { "NORMAL" };
        sqlx::query(&format!("PRAGMA synchronous = {mode}")).execute(&mut *self.conn).await?;
        Ok(())
    }
}

pub(crate) fn attr_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Attr> {
    let ts = |s: &str, n: &str| -> Result<Timestamp> {
        Ok(Timestamp { secs: row.try_get(s)?, nanos: row.try_get::<i64, _>(n)? as u32 })
    };
    let kind: i64 = row.try_get("kind")?;
    Ok(Attr {
        ino: row.try_get::<i64, _>("ino")? as u64,
        kind: FileKind::from_i64(kind).ok_or_else(|| MetaError::fs(ErrorCode::Io, format!("bad kind {kind}")))?,
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
    })
}

/// Loads an inode's attributes, `ENOENT` if it does not exist.
pub(crate) async fn get_attr<'e, E: sqlx::SqliteExecutor<'e>>(ex: E, ino: Ino) -> Result<Attr> {
    let row = sqlx::query(&format!("SELECT {INODE_COLUMNS} FROM inodes WHERE ino = ?"))
        .bind(ino as i64)
        .fetch_optional(ex)
        .await?;
    match row {
        Some(row) => attr_from_row(&row),
        None => Err(MetaError::fs(ErrorCode::NotFound, format!("no inode {ino}"))),
    }
}

/// Writes every attribute column of `attr` back.
pub(crate) async fn put_attr(tx: &mut Tx<'_>, a: &Attr) -> Result<()> {
    sqlx::query(
        "UPDATE inodes SET perm = ?, nlink = ?, uid = ?, gid = ?, rdev = ?, size = ?, atime_s = ?, \
         atime_ns = ?, mtime_s = ?, mtime_ns = ?, ctime_s = ?, ctime_ns = ? WHERE ino = ?",
    )
    .bind(a.perm as i64)
    .bind(a.nlink as i64)
    .bind(a.uid as i64)
    .bind(a.gid as i64)
    .bind(a.rdev as i64)
    .bind(a.size as i64)
    .bind(a.atime.secs)
    .bind(a.atime.nanos as i64)
    .bind(a.mtime.secs)
    .bind(a.mtime.nanos as i64)
    .bind(a.ctime.secs)
    .bind(a.ctime.nanos as i64)
    .bind(a.ino as i64)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Inserts a new inode and returns its number.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn insert_inode(
    tx: &mut Tx<'_>,
    ino: Option<Ino>,
    kind: FileKind,
    perm: u32,
    nlink: u32,
    uid: u32,
    gid: u32,
    rdev: u32,
    parent: Ino,
    target: Option<&[u8]>,
    now: Timestamp,
) -> Result<Ino> {
    let row = sqlx::query(
        "INSERT INTO inodes (ino, kind, perm, nlink, uid, gid, rdev, size, atime_s, atime_ns, mtime_s, \
         mtime_ns, ctime_s, ctime_ns, crtime_s, crtime_ns, parent, target) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING ino",
    )
    .bind(ino.map(|i| i as i64))
    .bind(kind.to_i64())
    .bind(perm as i64)
    .bind(nlink as i64)
    .bind(uid as i64)
    .bind(gid as i64)
    .bind(rdev as i64)
    .bind(target.map(|t| t.len() as i64).unwrap_or(0))
    .bind(now.secs)
    .bind(now.nanos as i64)
    .bind(now.secs)
    .bind(now.nanos as i64)
    .bind(now.secs)
    .bind(now.nanos as i64)
    .bind(now.secs)
    .bind(now.nanos as i64)
    .bind(parent as i64)
    .bind(target)
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.try_get::<i64, _>(0)? as u64)
}

/// The inode a name in a directory points to, with its kind.
pub(crate) async fn find_dentry<'e, E: sqlx::SqliteExecutor<'e>>(
    ex: E,
    parent: Ino,
    name: &[u8],
) -> Result<Option<(Ino, FileKind)>> {
    let row: Option<(i64, i64)> = sqlx::query_as("SELECT ino, kind FROM dentries WHERE parent = ? AND name = ?")
        .bind(parent as i64)
        .bind(name)
        .fetch_optional(ex)
        .await?;
    Ok(row.and_then(|(ino, kind)| Some((ino as u64, FileKind::from_i64(kind)?))))
}

/// Adds a directory entry; `EEXIST` if the name is taken.
pub(crate) async fn insert_dentry(tx: &mut Tx<'_>, parent: Ino, name: &[u8], ino: Ino, kind: FileKind) -> Result<()> {
    let done = sqlx::query("INSERT INTO dentries (parent, name, ino, kind) VALUES (?, ?, ?, ?)")
        .bind(parent as i64)
        .bind(name)
        .bind(ino as i64)
        .bind(kind.to_i64())
        .execute(&mut **tx)
        .await;
    match done {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            Err(MetaError::fs(ErrorCode::Exists, "entry exists"))
        }
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn delete_dentry(tx: &mut Tx<'_>, parent: Ino, name: &[u8]) -> Result<()> {
    sqlx::query("DELETE FROM dentries WHERE parent = ? AND name = ?")
        .bind(parent as i64)
        .bind(name)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub(crate) fn servers_to_text(servers: &[ServerId]) -> String {
    servers.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",")
}

pub(crate) fn servers_from_text(text: &str) -> Vec<ServerId> {
    text.split(',').filter_map(|s| s.parse().ok()).collect()
}
