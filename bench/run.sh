#!/usr/bin/env bash
# tidemark's benchmark, in one command (see BENCHMARKS.md):
#
#   bench/run.sh [--vizzes 200000] [--runs 3] [--big] [--tools a,b,...] [--no-scaling]
#                [--reseed | --reuse-source] [--drop-source] [--alt-bin PATH --alt-label TEXT]
#
# 1. installs the Python side (pymongo, psycopg[binary], dlt[postgres]) into state/bench-venv;
# 2. builds tidemark and examples/read_limit with the dist profile (fat LTO, as shipped);
# 3. seeds the VizHub-shaped demo data set (--vizzes, seed 42) into the source database
#    tm_bench_<vizzes> (kept for the next run; --reseed forces, --drop-source drops at the end);
# 4. alternating between tools, --runs times each, copies the same window of documentInfo into
#    fresh PostgreSQL databases (tm_bench_*; dropped after each run) and SQLite files:
#    tidemark (bench/flat.toml and config/mappings/vizhub.toml), bench/baseline.py (careful),
#    bench/baseline_naive.py, bench/dlt_pipeline.py, and the limits (examples/read_limit.rs;
#    psql COPY + upsert; psql COPY into the empty table; bench/sqlite_limit.py for SQLite);
#    checks every result against the source (count, ids, times, the tie at the window edge);
# 5. measures a run with nothing new and a one-day window at vizzes/10 and vizzes
#    (and a 1,000,000-document documentInfo cloned from the data set, with --big);
# 6. prints the table and writes bench/results/latest.md (+ latest.json).
#
# Environment: TIDEMARK__SOURCE__URI (default: scripts/ensure-mongo.sh, i.e. 127.0.0.1:27017),
# BENCH_PG (default postgres://postgres@127.0.0.1:5432; needs CREATE DATABASE rights),
# BENCH_PREFIX (default tm_bench: the names of every database it creates, and drops as leftovers).
# Times are printed, never asserted. The machine should be otherwise idle.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[bench] $*" >&2; }
export PATH="$HOME/.cargo/bin:$PATH"

VENV=state/bench-venv
PY_DEPS=(pymongo "psycopg[binary]" "dlt[postgres]")
if [[ ! -x $VENV/bin/python ]] || [[ ! -f $VENV/.deps-ok ]]; then
  log "installing ${PY_DEPS[*]} into $VENV"
  mkdir -p state
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "${PY_DEPS[@]}"
  touch "$VENV/.deps-ok"
fi

if [[ ! -x /usr/bin/time ]]; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    log "installing GNU time (for peak RSS)"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >&2
  else
    log "/usr/bin/time (GNU time) is missing: install the 'time' package"; exit 1
  fi
fi
command -v psql >/dev/null || { log "psql is missing (postgresql-client)"; exit 1; }

TIDEMARK__SOURCE__URI="$(scripts/ensure-mongo.sh)"
export TIDEMARK__SOURCE__URI

# The binaries measured are copied out of the build directory right after the build, so a
# build sharing CARGO_TARGET_DIR (another worktree) cannot swap them during the runs. Set both
# BENCH_TIDEMARK_BIN and BENCH_READ_LIMIT_BIN to measure prebuilt binaries without building.
if [[ -z ${BENCH_TIDEMARK_BIN:-} || -z ${BENCH_READ_LIMIT_BIN:-} ]]; then
  log "building tidemark and examples/read_limit (dist profile: fat LTO, as shipped)"
  cargo build --profile dist --quiet --bin tidemark --example read_limit
  target="${CARGO_TARGET_DIR:-target}"
  mkdir -p state/bench/bin
  cp "$target/dist/tidemark" state/bench/bin/tidemark
  cp "$target/dist/examples/read_limit" state/bench/bin/read_limit
  export BENCH_TIDEMARK_BIN="$PWD/state/bench/bin/tidemark" BENCH_READ_LIMIT_BIN="$PWD/state/bench/bin/read_limit"
  export BENCH_REV="${BENCH_REV:-$(git rev-parse --short HEAD)$(git status --porcelain --untracked-files=no -- src Cargo.toml | grep -q . && echo ' + uncommitted changes')}"
fi

exec "$VENV/bin/python" bench/bench.py "--argv=$*" "$@"
