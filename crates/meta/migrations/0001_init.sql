-- Cairn metadata schema, version 1. See ARCHITECTURE.md "SQL schema".

-- Volume-wide settings written by `cairn format`: name, uuid, chunk_size, block_size, replication.
CREATE TABLE volume (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

-- One row per inode. Times are split into seconds and nanoseconds.
CREATE TABLE inodes (
    ino      INTEGER PRIMARY KEY AUTOINCREMENT,
    kind     INTEGER NOT NULL,            -- cairn_proto::FileKind as integer
    perm     INTEGER NOT NULL,            -- permission bits incl. setuid/setgid/sticky
    nlink    INTEGER NOT NULL,
    uid      INTEGER NOT NULL,
    gid      INTEGER NOT NULL,
    rdev     INTEGER NOT NULL DEFAULT 0,
    size     INTEGER NOT NULL DEFAULT 0,
    atime_s  INTEGER NOT NULL, atime_ns  INTEGER NOT NULL,
    mtime_s  INTEGER NOT NULL, mtime_ns  INTEGER NOT NULL,
    ctime_s  INTEGER NOT NULL, ctime_ns  INTEGER NOT NULL,
    crtime_s INTEGER NOT NULL, crtime_ns INTEGER NOT NULL,
    parent   INTEGER NOT NULL DEFAULT 0,  -- directories only: the containing directory
    target   BLOB                         -- symlinks only
);

-- Directory entries. `cookie` orders readdir and is never reused, so listings stay stable
-- while entries are added and removed.
CREATE TABLE dentries (
    cookie INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL,
    name   BLOB NOT NULL,
    ino    INTEGER NOT NULL,
    kind   INTEGER NOT NULL,
    UNIQUE (parent, name)
);

CREATE TABLE xattrs (
    ino   INTEGER NOT NULL,
    name  BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ino, name)
) WITHOUT ROWID;

-- File data: slices per (inode, chunk) in commit order; a later slice shadows earlier ones
-- where they overlap. slice = 0 is a hole (reads as zeros).
CREATE TABLE slices (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    ino     INTEGER NOT NULL,
    chunk   INTEGER NOT NULL,
    pos     INTEGER NOT NULL,
    len     INTEGER NOT NULL,
    slice   INTEGER NOT NULL,
    servers TEXT NOT NULL             -- comma-separated chunk-server ids holding the blocks
);
CREATE INDEX slices_by_chunk ON slices (ino, chunk, seq);
CREATE INDEX slices_by_id ON slices (slice);

-- Slices no file references any more; a background task deletes their blocks.
CREATE TABLE gc_slices (
    slice   INTEGER PRIMARY KEY,
    len     INTEGER NOT NULL,
    servers TEXT NOT NULL
);

CREATE TABLE chunk_servers (
    id        INTEGER PRIMARY KEY,
    addr      TEXT NOT NULL,
    capacity  INTEGER NOT NULL,
    free      INTEGER NOT NULL,
    last_seen INTEGER NOT NULL        -- unix seconds
);

CREATE TABLE counters (
    name  TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
);
INSERT INTO counters (name, value) VALUES ('next_slice', 1);
