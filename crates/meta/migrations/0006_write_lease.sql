-- The epoch of each file's write lease (fencing token): bumped at every grant and at every
-- revocation; a commit must carry the current one. New files start at 1, held by their creator.
ALTER TABLE inodes ADD COLUMN lease INTEGER NOT NULL DEFAULT 1;
