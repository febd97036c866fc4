-- References that could not be resolved, one row per (document, column); cleared when the
-- document is written again with the reference resolved.
CREATE TABLE IF NOT EXISTS tidemark_missing_refs (
    entity      TEXT NOT NULL,
    source_id   TEXT NOT NULL,
    column_name TEXT NOT NULL,
    ref_entity  TEXT NOT NULL,
    ref_key     TEXT NOT NULL,
    policy      TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    seen_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (entity, source_id, column_name)
);

-- Documents held back (on_missing = "defer", or over the pull limit) and retried on later runs.
CREATE TABLE IF NOT EXISTS tidemark_pending (
    entity        TEXT NOT NULL,
    source_id     TEXT NOT NULL,
    reason        TEXT NOT NULL,
    attempts      BIGINT NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL,
    run_id        TEXT NOT NULL,
    PRIMARY KEY (entity, source_id)
);
