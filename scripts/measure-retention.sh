#!/usr/bin/env bash
# How much the runs ledger, the provenance and the report files grow per nightly run
# (docs/OPERATIONS.md, Retention): seed the demo, load it, then simulate nights of
# application writes (`tidemark demo touch`) each followed by a run, and print what each
# run added. Needs the `psql` and `sqlite3` command-line clients.
#
#   scripts/measure-retention.sh [--vizzes 20000] [--percent 1] [--nights 3] [--bin target/release/tidemark]
#
# Environment: MONGO_URI (default mongodb://127.0.0.1:27017), PG_URL (an admin URL, default
# postgres://postgres@127.0.0.1:5432/postgres). It seeds the MongoDB database tm_retention
# (re-seeded, never dropped: drop it by hand when done), creates and drops its own
# PostgreSQL database, and writes under a temporary folder.
set -euo pipefail

vizzes=20000 percent=1 nights=3 bin=target/release/tidemark
while [ $# -gt 0 ]; do
    case "$1" in
        --vizzes) vizzes=$2; shift 2 ;;
        --percent) percent=$2; shift 2 ;;
        --nights) nights=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
mongo=${MONGO_URI:-mongodb://127.0.0.1:27017}
pg_admin=${PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
name=tm_retention
pg_url=${pg_admin%/*}/$name
work=$(mktemp -d)
trap 'psql -q "$pg_admin" -c "DROP DATABASE IF EXISTS $name WITH (FORCE)" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
psql -q "$pg_admin" -c "DROP DATABASE IF EXISTS $name WITH (FORCE)" -c "CREATE DATABASE $name" >/dev/null

export TIDEMARK__SOURCE__URI=$mongo TIDEMARK__SOURCE__DATABASE=$name TIDEMARK__SYNC__SETTLE=0s \
    TIDEMARK__LOG__LEVEL=warn
"$bin" demo seed --vizzes "$vizzes" --seed 42 --force >/dev/null

# bytes of the report files, rows and bytes of the ledger and provenance tables
measure() { # backend url reports
    local files bytes
    files=$(find "$3" -name '*.json' 2>/dev/null | wc -l)
    bytes=$(du -sb "$3" 2>/dev/null | cut -f1)
    if [ "$1" = sqlite ]; then
        local db=${2#sqlite://}
        sqlite3 "$db" "SELECT $files, ${bytes:-0},
            (SELECT COUNT(*) FROM tidemark_runs), (SELECT COUNT(*) FROM tidemark_provenance),
            (SELECT COUNT(*) FROM tidemark_run_lanes),
            (SELECT SUM(pgsize) FROM dbstat WHERE name IN ('tidemark_runs', 'sqlite_autoindex_tidemark_runs_1')),
            (SELECT SUM(pgsize) FROM dbstat WHERE name IN ('tidemark_provenance', 'tidemark_provenance_run')),
            (SELECT SUM(pgsize) FROM dbstat WHERE name LIKE '%tidemark_run_lanes%'),
            $(stat -c %s "$db")" | tr '|' ' '
    else
        psql -qtA -F ' ' "$2" -c "SELECT $files, ${bytes:-0},
            (SELECT COUNT(*) FROM tidemark_runs), (SELECT COUNT(*) FROM tidemark_provenance),
            (SELECT COUNT(*) FROM tidemark_run_lanes),
            pg_total_relation_size('tidemark_runs'), pg_total_relation_size('tidemark_provenance'),
            pg_total_relation_size('tidemark_run_lanes'), pg_database_size(current_database())"
    fi
}

echo "step backend report_files report_bytes runs provenance_rows lane_rows runs_bytes provenance_bytes lanes_bytes database_bytes seconds"
for night in initial $(seq 1 "$nights") quiet; do
    if [ "$night" != initial ] && [ "$night" != quiet ]; then
        "$bin" demo touch --percent "$percent" --seed "$night" >/dev/null
    fi
    for backend in sqlite postgres; do
        if [ $backend = sqlite ]; then url=sqlite://$work/target.db; else url=$pg_url; fi
        export TIDEMARK__TARGET__URL=$url TIDEMARK__STATE_DIR=$work/$backend
        start=$(date +%s.%N)
        "$bin" run >/dev/null
        secs=$(echo "$(date +%s.%N) - $start" | bc)
        echo "$night $backend $(measure $backend "$url" "$work/$backend/reports") $secs"
    done
done
