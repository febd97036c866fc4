#!/usr/bin/env bash
# The whole test suite: the alerting rules (promtool, installed if missing), then Rust
# against real services: MongoDB (SecantusDB started locally unless MONGO_URI is set),
# PostgreSQL (TIDEMARK_TEST_PG_URL or DATABASE_URL, default
# postgres://postgres@127.0.0.1:5432/postgres) and SQLite (temporary files); also validates
# deploy/kubernetes/ (scripts/check-kubernetes.sh installs its validator from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || { echo "cargo is missing: install Rust from https://rustup.rs" >&2; exit 1; }

export TIDEMARK_TEST_PG_URL="${TIDEMARK_TEST_PG_URL:-${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}}"
if command -v pg_isready >/dev/null && ! pg_isready -q -d "$TIDEMARK_TEST_PG_URL"; then
  echo "PostgreSQL is not reachable at TIDEMARK_TEST_PG_URL=$TIDEMARK_TEST_PG_URL." >&2
  echo "Start it (e.g. pg_ctlcluster 15 main start) or point TIDEMARK_TEST_PG_URL at a server." >&2
  exit 1
fi
export MONGO_URI="$(scripts/ensure-mongo.sh)"
echo "== MongoDB: $MONGO_URI  PostgreSQL: ${TIDEMARK_TEST_PG_URL%%@*}@..." >&2

echo "== promtool: alerting rules and their tests (deploy/prometheus)" >&2
if ! command -v promtool >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing promtool (Debian package prometheus)" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >&2
  else
    echo "promtool is missing and cannot be installed automatically (need root + apt-get)." >&2
    echo "Install it (Debian/Ubuntu: apt-get install prometheus; or a Prometheus release's promtool) and run again." >&2
    exit 1
  fi
fi
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --all-targets --quiet -- -D warnings
echo "== Kubernetes manifests (scripts/check-kubernetes.sh)" >&2
scripts/check-kubernetes.sh
echo "== cargo test" >&2
cargo test --all-targets -- --test-threads="${TEST_THREADS:-2}"
