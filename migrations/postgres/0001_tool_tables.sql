-- tidemark's own tables. Domain tables are declared in the mapping.
CREATE TABLE IF NOT EXISTS tidemark_checkpoints (
    lane          TEXT PRIMARY KEY,
    entity        TEXT NOT NULL,
    watermark_ms  BIGINT,
    open_from_ms  BIGINT,
    open_to_ms    BIGINT,
    last_ts       TEXT,
    last_id       TEXT,
    run_id        TEXT,
    updated_at_ms BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS tidemark_runs (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    dry_run         BOOLEAN NOT NULL DEFAULT FALSE,
    status          TEXT NOT NULL,
    host            TEXT NOT NULL,
    pid             BIGINT NOT NULL,
    started_at_ms   BIGINT NOT NULL,
    finished_at_ms  BIGINT,
    settings_fingerprint TEXT NOT NULL,
    mapping_version TEXT NOT NULL,
    report          TEXT
);

CREATE TABLE IF NOT EXISTS tidemark_dead_letters (
    entity          TEXT NOT NULL,
    source_id       TEXT NOT NULL,
    run_id          TEXT NOT NULL,
    error           TEXT NOT NULL,
    document        TEXT NOT NULL,
    mapping_version TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    PRIMARY KEY (entity, source_id)
);

CREATE TABLE IF NOT EXISTS tidemark_locks (
    lane          TEXT PRIMARY KEY,
    holder        TEXT NOT NULL,
    host          TEXT NOT NULL,
    pid           BIGINT NOT NULL,
    acquired_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
