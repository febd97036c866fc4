-- Retention (`tidemark prune`): one row per run whose provenance was pruned, kept after the
-- run's own ledger row is deleted, so `tidemark rollback` can say "pruned on <date>" instead
-- of "no such run". About 100 bytes per run: ten years of nightly runs are well under 1 MB.
CREATE TABLE IF NOT EXISTS tidemark_pruned_runs (
    id             TEXT PRIMARY KEY,
    kind           TEXT NOT NULL,
    status         TEXT NOT NULL,
    started_at_ms  INTEGER NOT NULL,
    finished_at_ms INTEGER,
    pruned_at_ms   INTEGER NOT NULL
);
