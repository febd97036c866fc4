#!/usr/bin/env bash
# Make sure a MongoDB-compatible server is reachable and print its URI on stdout.
#
# - If MONGO_URI is set (or TIDEMARK__SOURCE__URI), use it as is.
# - Otherwise install SecantusDB's secantusd-rs if missing (needs cmake; ~3 min on 2 cores)
#   and start it on 127.0.0.1:${TIDEMARK_MONGO_PORT:-27017} with its data under state/secantus.
# Progress goes to stderr; the URI is the only thing on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

SECANTUS_VERSION="0.5.3-beta.193"
PORT="${TIDEMARK_MONGO_PORT:-27017}"
log() { echo "[ensure-mongo] $*" >&2; }

uri="${MONGO_URI:-${TIDEMARK__SOURCE__URI:-}}"
if [[ -n "$uri" ]]; then
  echo "$uri"
  exit 0
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

export PATH="$HOME/.cargo/bin:$PATH"
if ! port_open "$PORT"; then
  if ! command -v secantusd-rs >/dev/null 2>&1; then
    if ! command -v cmake >/dev/null 2>&1; then
      if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing cmake (needed to build secantusd-rs)"
        apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >&2
      else
        log "cmake is missing and cannot be installed automatically (need root + apt-get)."
        log "Install cmake, or set MONGO_URI=mongodb://host:port to use an existing server."
        exit 1
      fi
    fi
    log "installing secantus-mdb ${SECANTUS_VERSION} with cargo (about 3 minutes on 2 cores)"
    cargo install secantus-mdb --version "$SECANTUS_VERSION" --ignore-rust-version --locked >&2 \
      || cargo install secantus-mdb --version "$SECANTUS_VERSION" --ignore-rust-version >&2
  fi
  mkdir -p state/secantus
  log "starting secantusd-rs on 127.0.0.1:$PORT (data in state/secantus, log in state/secantus.log)"
  nohup secantusd-rs --host 127.0.0.1 --port "$PORT" --storage-path state/secantus \
    --cache-size 1G --log-file-max 32MB --log-level WARNING >state/secantus.log 2>&1 &
  echo $! > state/secantus.pid
  for _ in $(seq 1 120); do
    port_open "$PORT" && break
    sleep 0.5
  done
  if ! port_open "$PORT"; then
    log "secantusd-rs did not start; see state/secantus.log:"
    tail -20 state/secantus.log >&2 || true
    exit 1
  fi
fi
echo "mongodb://127.0.0.1:$PORT"
