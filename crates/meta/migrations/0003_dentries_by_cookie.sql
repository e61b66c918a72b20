-- readdir pages through a directory in cookie order: without this index every page sorted
-- the whole directory.
CREATE INDEX dentries_by_cookie ON dentries (parent, cookie);
