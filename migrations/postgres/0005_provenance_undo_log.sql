-- Provenance becomes an undo log: one record per batch that changed a row (before, a row had
-- one record per run, merged with ON CONFLICT), and every row a batch inserted shares one
-- record per table (`inserted`: a JSON array of [canonical key, after-hash] pairs; `pk` is
-- '' on such records). `tidemark rollback` undoes records newest first, each against the
-- state the later ones left. Records written before this migration (one per row and run)
-- are a special case of the same log and roll back the same way.
--
-- Why: the unique (run_id, table_name, pk) index and one record per inserted row were about
-- a third of a first load's time (BENCHMARKS.md). A batch now writes one record per inserted
-- table and one per changed or deleted row, with no conflict check.
ALTER TABLE tidemark_provenance DROP CONSTRAINT IF EXISTS tidemark_provenance_run_id_table_name_pk_key;
ALTER TABLE tidemark_provenance ADD COLUMN IF NOT EXISTS inserted TEXT;
CREATE INDEX IF NOT EXISTS tidemark_provenance_run ON tidemark_provenance (run_id, id);
