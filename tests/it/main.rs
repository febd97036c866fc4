//! Integration tests against real MongoDB (SecantusDB or mongod via MONGO_URI),
//! PostgreSQL (TIDEMARK_TEST_PG_URL) and SQLite. One binary, one module per topic.

mod bad_config;
mod crash_resume;
mod deps;
mod encodings;
mod fault_kill;
mod fault_late;
mod fault_source;
mod fault_target;
mod fault_util;
mod fuzz_mapping;
mod harness;
mod hostile_config;
mod hostile_docs;
mod hostile_ids;
mod idempotence;
mod mapping_domains;
mod mapping_golden;
mod ops_backfill;
mod ops_daemon;
mod ops_lock;
mod ops_status;
mod ops_systemd;
mod ops_util;
mod records;
mod schema;
mod security;
mod ties;
mod tls;
mod trust_deadletters;
mod trust_dryrun;
mod trust_rollback;
mod trust_sweep;
mod trust_util;
mod trust_verify;
mod write_race;
