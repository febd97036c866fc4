-- The `inserted` list of a provenance record ([canonical key, after-hash] pairs, about 60 KB
-- per batch of 1,000 new rows) is mostly hex hashes, which pglz cannot shrink: compressing
-- it cost ~2 ms per batch for a 3 % smaller value. Store it out of line, uncompressed.
ALTER TABLE tidemark_provenance ALTER COLUMN inserted SET STORAGE EXTERNAL;
