-- Bytes of data slices a file references (holes excluded), so stat can report st_blocks for
-- sparse files instead of the size. Overwritten bytes count until compaction replaces them;
-- stat caps it at the size.
ALTER TABLE inodes ADD COLUMN stored INTEGER NOT NULL DEFAULT 0;
UPDATE inodes SET stored = (SELECT total(len) FROM slices WHERE slices.ino = inodes.ino AND slice != 0);
