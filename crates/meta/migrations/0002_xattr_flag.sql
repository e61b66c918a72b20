-- Whether an inode has any xattr, so clients can answer getxattr/listxattr misses (ls -l asks
-- for security.selinux on every file) without a round trip.
ALTER TABLE inodes ADD COLUMN xattrs INTEGER NOT NULL DEFAULT 0;
