-- Provenance becomes an undo log: one record per batch that changed a row (before, a row had
-- one record per run, merged with ON CONFLICT), and every row a batch inserted shares one
-- record per table (`inserted`: a JSON array of [canonical key, after-hash] pairs; `pk` is
-- '' on such records). `tidemark rollback` undoes records newest first, each against the
-- state the later ones left. Records written before this migration (one per row and run)
-- are a special case of the same log and roll back the same way.
--
-- SQLite cannot drop a constraint, so the table is rebuilt (ids kept).
CREATE TABLE tidemark_provenance_undo (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id        TEXT NOT NULL,
    table_name    TEXT NOT NULL,
    pk            TEXT NOT NULL,
    before_image  TEXT,
    after_hash    TEXT,
    written_at_ms INTEGER NOT NULL,
    inserted      TEXT
);
INSERT INTO tidemark_provenance_undo (id, run_id, table_name, pk, before_image, after_hash, written_at_ms)
    SELECT id, run_id, table_name, pk, before_image, after_hash, written_at_ms FROM tidemark_provenance;
DROP TABLE tidemark_provenance;
ALTER TABLE tidemark_provenance_undo RENAME TO tidemark_provenance;
CREATE INDEX tidemark_provenance_run ON tidemark_provenance (run_id, id);
