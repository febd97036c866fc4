#!/usr/bin/env bash
# The main job on the embedded default: a MongoDB-compatible server (started locally unless
# TIDEMARK__SOURCE__URI is set), the VizHub-V2 demo data, then `tidemark run` into SQLite at
# state/tidemark.db, and a summary.  Usage: scripts/demo.sh [--vizzes N] [--seed S]
set -euo pipefail
cd "$(dirname "$0")/.."
VIZZES=20000
SEED=42
while [[ $# -gt 0 ]]; do
  case "$1" in
    --vizzes) VIZZES="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    *) echo "usage: scripts/demo.sh [--vizzes N] [--seed S]" >&2; exit 2 ;;
  esac
done
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || { echo "cargo is missing: install Rust from https://rustup.rs" >&2; exit 1; }
TIDEMARK__SOURCE__URI="$(scripts/ensure-mongo.sh)"
export TIDEMARK__SOURCE__URI
export TIDEMARK__TARGET__URL="${TIDEMARK__TARGET__URL:-sqlite://state/tidemark.db}"
# The release profile builds in minutes (no cross-crate LTO); packaged binaries use
# `cargo build --profile dist` (BENCHMARKS.md, "Build profiles").
echo "== building tidemark (release; the first build compiles every dependency)" >&2
cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/tidemark"
echo "== seeding $VIZZES vizzes (seed $SEED) into ${TIDEMARK__SOURCE__URI}" >&2
"$BIN" demo seed --vizzes "$VIZZES" --seed "$SEED"
echo "== migrate" >&2
"$BIN" migrate
echo "== run" >&2
set +e
"$BIN" run
code=$?
set -e
echo "== status" >&2
"$BIN" status || true
exit $code
