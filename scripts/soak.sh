#!/usr/bin/env bash
# Soak and long fault runs (figures printed at the end):
#   1. the daemon on a 1-minute schedule for SOAK_MINUTES (default 10) while a writer keeps
#      inserting and updating source documents, then a last catch-up and a document-by-document
#      comparison of source and target; peak RSS of the daemon;
#   2. the mapping fuzzer (proptest) at scale for FUZZ_CASES cases (default 20000);
#   3. the SIGKILL fault test with more kills and data (FAULT_KILLS, FAULT_VIZZES).
# Uses a private secantusd-rs on a free port (never the shared one) and a temporary SQLite target.
#   SOAK_MINUTES=3 scripts/soak.sh          # a short proof run
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
MINUTES="${SOAK_MINUTES:-10}"
FUZZ_CASES="${FUZZ_CASES:-20000}"
log() { echo "[soak] $*" >&2; }

cargo build --quiet --bin tidemark --example soak_writer
BIN=target/debug/tidemark
WRITER=target/debug/examples/soak_writer
WORK="$(mktemp -d)"
cleanup() {
  [[ -n "${DAEMON_PID:-}" ]] && kill "$DAEMON_PID" 2>/dev/null || true
  [[ -n "${WRITER_PID:-}" ]] && kill "$WRITER_PID" 2>/dev/null || true
  [[ -n "${MONGO_PID:-}" ]] && kill "$MONGO_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

secantusd-rs --host 127.0.0.1 --port 0 --storage-path "$WORK/mongo" --cache-size 256M \
  --log-file-max 16MB --log-level WARNING >"$WORK/mongo.out" 2>&1 &
MONGO_PID=$!
for _ in $(seq 1 100); do grep -q listening "$WORK/mongo.out" && break; sleep 0.1; done
PORT="$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$WORK/mongo.out")"
URI="mongodb://127.0.0.1:$PORT/?directConnection=true"
log "private source $URI, work dir $WORK"

cat >"$WORK/mapping.toml" <<'TOML'
version = "soak"
[entities.items]
collection = "items"
time_field = "t"
time_encoding = "epoch_millis"
table = "items"
primary_key = ["id"]
[entities.items.columns]
id = { path = "_id", type = "bigint", required = true }
t = { path = "t", type = "timestamptz", from = "epoch_millis", required = true }
v = { path = "v", type = "text" }
TOML

export TIDEMARK__SOURCE__URI="$URI" TIDEMARK__SOURCE__DATABASE=soak \
  TIDEMARK__TARGET__URL="sqlite://$WORK/target.db" TIDEMARK__SYNC__MAPPING="$WORK/mapping.toml" \
  TIDEMARK__SYNC__START="$(date -u -d '-1 day' +%Y-%m-%dT%H:%M:%SZ)" \
  TIDEMARK__SYNC__SETTLE=5s TIDEMARK__SYNC__OVERLAP=10m TIDEMARK__STATE_DIR="$WORK" \
  TIDEMARK__DAEMON__SCHEDULE="0 * * * * *" TIDEMARK__DAEMON__RUN_ON_START=true \
  TIDEMARK__DAEMON__METRICS_LISTEN="" TIDEMARK__LOG__FORMAT=json
# With a 5 s settle, a write whose `t` is stamped a little before it lands (client clock,
# in-flight insert) is still inside the 10 min overlap of the next run.

SECS=$((MINUTES * 60))
"$WRITER" write "$URI" soak "$SECS" >"$WORK/writer.out" &
WRITER_PID=$!
"$BIN" daemon 2>"$WORK/daemon.log" &
DAEMON_PID=$!
peak=0
start=$(date +%s)
while kill -0 "$WRITER_PID" 2>/dev/null; do
  rss=$(awk '/VmHWM/ {print $2}' "/proc/$DAEMON_PID/status" 2>/dev/null || echo 0)
  cur=$(awk '/VmRSS/ {print $2}' "/proc/$DAEMON_PID/status" 2>/dev/null || echo 0)
  (( rss > peak )) && peak=$rss
  log "t+$(( $(date +%s) - start ))s daemon RSS ${cur} kB (peak ${rss} kB)"
  sleep 30
done
wait "$WRITER_PID"; WRITER_PID=
peak=$(awk '/VmHWM/ {print $2}' "/proc/$DAEMON_PID/status")
kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" || true; DAEMON_PID=
runs=$(grep -c '"run finished"\|window done' "$WORK/daemon.log" || true)
sleep 6   # past the settle delay
"$BIN" run >"$WORK/final.out" 2>>"$WORK/daemon.log"
cat "$WORK/writer.out"
if "$WRITER" check "$URI" soak "sqlite://$WORK/target.db" >"$WORK/check.out"; then ok=yes; else ok=NO; fi
cat "$WORK/check.out"
# tidemark's own verify (bucketed hashes, then keys) over the whole synced range.
if "$BIN" verify --from "$TIDEMARK__SYNC__START" --to "$(date -u -d '-10 seconds' +%Y-%m-%dT%H:%M:%SZ)" \
    >"$WORK/verify.out" 2>>"$WORK/daemon.log"; then verified=yes; else verified="NO (exit $?)"; ok=NO; fi
tail -3 "$WORK/verify.out"
echo "soak: ${MINUTES} min, daemon peak RSS ${peak} kB, ${runs} window/run log lines, source == target: $ok, verify: $verified"
[[ $ok == yes ]] || { tail -20 "$WORK/daemon.log" >&2; exit 1; }

log "mapping fuzzer: $FUZZ_CASES cases"
t0=$(date +%s)
TIDEMARK_FUZZ_CASES="$FUZZ_CASES" cargo test --quiet --test it fuzz_mapping -- --nocapture 2>&1 | tail -3
echo "fuzz: $FUZZ_CASES cases in $(( $(date +%s) - t0 )) s"

log "SIGKILL faults: ${FAULT_KILLS:-50} kills over ${FAULT_VIZZES:-5000} vizzes"
TIDEMARK_FAULT_KILLS="${FAULT_KILLS:-50}" TIDEMARK_FAULT_VIZZES="${FAULT_VIZZES:-5000}" \
  cargo test --quiet --test it fault_kill -- --nocapture 2>&1 | grep -E 'fault_kill|test result|panicked' || true
