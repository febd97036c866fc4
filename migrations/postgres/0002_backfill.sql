-- Manual backfills: one row per backfill, one row per (entity, chunk). A chunk row is
-- also the chunk's lease: a worker claims it (FOR UPDATE SKIP LOCKED on PostgreSQL), heartbeats
-- lease_expires_ms while it runs, and an expired claim can be taken over.
CREATE TABLE IF NOT EXISTS tidemark_backfills (
    id             TEXT PRIMARY KEY,
    from_ms        BIGINT NOT NULL,
    to_ms          BIGINT NOT NULL,
    chunk_ms       BIGINT NOT NULL,
    entities       TEXT NOT NULL,
    status         TEXT NOT NULL,
    created_by     TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    finished_at_ms BIGINT
);

CREATE TABLE IF NOT EXISTS tidemark_backfill_chunks (
    backfill_id      TEXT NOT NULL REFERENCES tidemark_backfills (id),
    entity           TEXT NOT NULL,
    from_ms          BIGINT NOT NULL,
    to_ms            BIGINT NOT NULL,
    lane             TEXT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending',
    holder           TEXT,
    host             TEXT,
    pid              BIGINT,
    claimed_at_ms    BIGINT,
    lease_expires_ms BIGINT,
    attempts         BIGINT NOT NULL DEFAULT 0,
    docs_read        BIGINT NOT NULL DEFAULT 0,
    docs_written     BIGINT NOT NULL DEFAULT 0,
    dead_lettered    BIGINT NOT NULL DEFAULT 0,
    finished_at_ms   BIGINT,
    error            TEXT,
    PRIMARY KEY (backfill_id, entity, from_ms)
);

CREATE INDEX IF NOT EXISTS tidemark_backfill_chunks_claim
    ON tidemark_backfill_chunks (backfill_id, status, from_ms);
