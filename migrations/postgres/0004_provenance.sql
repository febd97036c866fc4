-- Provenance for `tidemark rollback`: for every domain row a run inserted, changed or
-- deleted, the row as it was before the run first touched it (NULL = the run inserted it)
-- and a hash of the row as the run left it (NULL = the run deleted it). Written in the
-- same transaction as the rows. Rows a run left unchanged are not recorded. Domain tables
-- carry no provenance columns: the new application owns them.
CREATE TABLE IF NOT EXISTS tidemark_provenance (
    id            BIGSERIAL PRIMARY KEY,
    run_id        TEXT NOT NULL,
    table_name    TEXT NOT NULL,
    pk            TEXT NOT NULL,
    before_image  TEXT,
    after_hash    TEXT,
    written_at_ms BIGINT NOT NULL,
    UNIQUE (run_id, table_name, pk)
);

-- No separate (table_name, pk) index: the unique index serves rollback's "later runs that
-- touched the same rows" join (b.run_id = ?, b.table_name = ?, b.pk = ?), and every extra
-- index is paid on each row a run writes.

-- The checkpoint of every lane a run moved, as it was before the run first moved it
-- (existed = false: the lane had no checkpoint), so a rollback can rewind the lane.
CREATE TABLE IF NOT EXISTS tidemark_run_lanes (
    run_id       TEXT NOT NULL,
    lane         TEXT NOT NULL,
    entity       TEXT NOT NULL,
    existed      BOOLEAN NOT NULL,
    watermark_ms BIGINT,
    open_from_ms BIGINT,
    open_to_ms   BIGINT,
    last_ts      TEXT,
    last_id      TEXT,
    prev_run_id  TEXT,
    PRIMARY KEY (run_id, lane)
);
