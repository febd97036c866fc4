-- The order in which batches committed, for `tidemark rollback` (newest first). The record
-- ids (BIGSERIAL) follow the order in which batches *inserted* their records, and on
-- PostgreSQL batches of different lanes commit concurrently: a batch may insert its records
-- before another batch that wrote a row it references, and commit after it (its deferred
-- foreign-key check at COMMIT needs that row committed). Undoing by id then deleted the
-- referenced row first, its `ON DELETE SET NULL` changed the referencing row, and the
-- rollback reported that row as changed by someone else (RELIABILITY.md, session 25).
--
-- A deferred constraint trigger numbers each record at COMMIT, after the foreign-key checks
-- queued before it by the same transaction: a batch whose check needed another batch's row
-- takes its numbers after that batch took its own. Within a batch the numbers follow the ids.
-- Records of runs written before this migration keep commit_seq NULL and are undone by id.
ALTER TABLE tidemark_provenance ADD COLUMN IF NOT EXISTS commit_seq BIGINT;
CREATE SEQUENCE IF NOT EXISTS tidemark_provenance_commit_seq;

CREATE OR REPLACE FUNCTION tidemark_provenance_number() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tidemark_provenance SET commit_seq = nextval('tidemark_provenance_commit_seq')
    WHERE id = NEW.id;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS tidemark_provenance_number ON tidemark_provenance;
CREATE CONSTRAINT TRIGGER tidemark_provenance_number
    AFTER INSERT ON tidemark_provenance
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION tidemark_provenance_number();
-- `target.foreign_key_checks = "tidemark"` writes with session_replication_role = replica,
-- which silences ordinary triggers: this one numbers records in every mode.
ALTER TABLE tidemark_provenance ENABLE ALWAYS TRIGGER tidemark_provenance_number;

-- Rollback reads one run's records newest first, a few at a time.
CREATE INDEX IF NOT EXISTS ix_tidemark_provenance_commit ON tidemark_provenance (run_id, commit_seq);
