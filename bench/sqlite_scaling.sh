#!/usr/bin/env bash
# The full VizHub mapping into SQLite at several sizes, in one sitting (BENCHMARKS.md, "SQLite
# that scales"): is the cost linear in the data? And the same mapping into PostgreSQL at the
# largest size, for docs/s against docs/s.
#
#   bench/sqlite_scaling.sh [--sizes 20000,50000,200000] [--bin PATH] [--seed 7] [--no-postgres]
#                           [--source-prefix P] [-- KEY=VALUE ...]   (extra environment for every run)
#
# Each size's demo data set is seeded once into the source database <BENCH_PREFIX>_scale_<N>
# (or <P><N> with --source-prefix; kept; a marker file under state/bench/ remembers it) and copied by `tidemark run` into a
# fresh SQLite file under state/bench/scaling/. Prints one markdown line per run: wall, user,
# system seconds and peak RSS from GNU time, documents read, docs/s. Times are printed, never
# asserted; the machine should be otherwise idle. Environment as bench/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=20000,50000,200000
SRC_PREFIX=
BIN=
SEED=7
PG=1
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --sizes) SIZES="$2"; shift 2 ;;
    --bin) BIN="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --no-postgres) PG=0; shift ;;
    --source-prefix) SRC_PREFIX="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "usage: bench/sqlite_scaling.sh [--sizes a,b,c] [--bin PATH] [--seed S] [--no-postgres] [-- K=V ...]" >&2; exit 2 ;;
  esac
done
PREFIX="${BENCH_PREFIX:-tm_bench}"
SRC_PREFIX="${SRC_PREFIX:-${PREFIX}_scale_}"
BENCH_PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
[[ -x /usr/bin/time ]] || { echo "/usr/bin/time (GNU time) is missing: install the 'time' package" >&2; exit 1; }
if [[ -z $BIN ]]; then
  cargo build --release --quiet --bin tidemark
  mkdir -p state/bench/bin
  cp "${CARGO_TARGET_DIR:-target}/release/tidemark" state/bench/bin/tidemark-scaling
  BIN=state/bench/bin/tidemark-scaling
fi
TIDEMARK__SOURCE__URI="${TIDEMARK__SOURCE__URI:-$(scripts/ensure-mongo.sh)}"
export TIDEMARK__SOURCE__URI
OUT=state/bench/scaling
mkdir -p "$OUT"
# The demo data's dirt grows with its size (bad times, dangling references): at 200,000 vizzes
# it passes the default error budget of 1,000 dead letters.
export TIDEMARK__SYNC__ERROR_BUDGET=10000000 TIDEMARK__SYNC__MAPPING=config/mappings/vizhub.toml

one() { # label target-url
  local label=$1 url=$2 log="$OUT/$1"
  env TIDEMARK__TARGET__URL="$url" TIDEMARK__STATE_DIR="$OUT/state-$label" "${EXTRA[@]}" \
    /usr/bin/time -v "$BIN" run >"$log.out" 2>"$log.err" || { echo "| $label | FAILED: see $log.err |"; return; }
  local w u s r docs
  w=$(awk -F': ' '/Elapsed/ {print $2}' "$log.err")
  u=$(awk -F': ' '/User time/ {print $2}' "$log.err")
  s=$(awk -F': ' '/System time/ {print $2}' "$log.err")
  r=$(awk -F': ' '/Maximum resident/ {printf "%.0f", $2/1024}' "$log.err")
  docs=$(grep -o '"read":[0-9]*' "$log.err" | cut -d: -f2 | paste -sd+ | bc)
  local secs
  secs=$(echo "$w" | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
  echo "| $label | $docs | $w | $u | $s | $r | $(echo "$docs / $secs" | bc) | $(cut -d' ' -f1 /proc/loadavg) |"
}

echo "| run | documents read | wall | user s | sys s | peak RSS MB | docs/s | load |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
IFS=, read -r -a sizes <<<"$SIZES"
for n in "${sizes[@]}"; do
  db="${SRC_PREFIX}$n"
  marker="state/bench/.seeded-$db-$SEED"
  export TIDEMARK__SOURCE__DATABASE="$db"
  if [[ ! -f $marker ]]; then
    "$BIN" demo seed --vizzes "$n" --seed "$SEED" --force >"$OUT/seed-$n.log" 2>&1
    touch "$marker"
  fi
  rm -rf "$OUT/sqlite-$n.db"* "$OUT/state-sqlite-$n"
  one "sqlite-$n" "sqlite://$OUT/sqlite-$n.db"
done
if [[ $PG == 1 ]]; then
  n="${sizes[-1]}"
  export TIDEMARK__SOURCE__DATABASE="${SRC_PREFIX}$n"
  pgdb="${PREFIX}_scale_pg_$n"
  psql -q "$BENCH_PG/postgres" -c "DROP DATABASE IF EXISTS $pgdb" -c "CREATE DATABASE $pgdb"
  one "postgres-$n" "$BENCH_PG/$pgdb"
  psql -q "$BENCH_PG/postgres" -c "DROP DATABASE IF EXISTS $pgdb"
fi
