#!/usr/bin/env bash
# Validates deploy/kubernetes/*.yaml offline: (1) against the Kubernetes OpenAPI schemas of the
# oldest and newest versions we claim (strict: unknown fields are errors), with
# kubernetes-validate from PyPI, which bundles the schemas (kubeconform downloads them at run
# time, which CI cannot); (2) the ConfigMap's mapping.toml is config/mappings/vizhub.toml;
# (3) the ConfigMap's settings pass `tidemark check-config` (binary: $TIDEMARK_BIN, else
# `cargo build`). Installs kubernetes-validate into state/tools/k8s-venv on first use.
# Usage: scripts/check-kubernetes.sh
set -euo pipefail
cd "$(dirname "$0")/.."
K8S_VALIDATE_VERSION=1.37.0
VERSIONS=(1.29.0 1.37.0)
VENV=state/tools/k8s-venv
if ! "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$K8S_VALIDATE_VERSION"; then
  echo "== installing kubernetes-validate $K8S_VALIDATE_VERSION (PyPI) into $VENV" >&2
  command -v python3 >/dev/null || { echo "python3 is missing: apt-get install python3 python3-venv" >&2; exit 1; }
  if ! python3 -m venv "$VENV" || ! "$VENV/bin/pip" install --quiet "kubernetes-validate==$K8S_VALIDATE_VERSION"; then
    echo "could not install kubernetes-validate from PyPI into $VENV: needs python3-venv (apt-get install python3-venv) and access to PyPI" >&2
    exit 1
  fi
fi
for v in "${VERSIONS[@]}"; do
  echo "== kubernetes-validate --strict -k $v deploy/kubernetes/*.yaml" >&2
  "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" deploy/kubernetes/*.yaml
done

if [[ -z "${TIDEMARK_BIN:-}" ]]; then
  cargo build --quiet
  TIDEMARK_BIN="${CARGO_TARGET_DIR:-target}/debug/tidemark"
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/python" - "$tmp" <<'PY'
import sys, yaml
out = sys.argv[1]
cm = yaml.safe_load(open("deploy/kubernetes/configmap.yaml"))["data"]
if cm["mapping.toml"] != open("config/mappings/vizhub.toml").read():
    sys.exit("deploy/kubernetes/configmap.yaml: mapping.toml differs from config/mappings/vizhub.toml; "
             "regenerate it (see the comment at the top of configmap.yaml)")
for name, text in cm.items():
    open(f"{out}/{name}", "w").write(text)
PY
echo "== tidemark check-config with the ConfigMap's settings" >&2
# The same settings as in the pods, with the container paths pointed at the extracted files.
TIDEMARK_CONFIG="$tmp/tidemark.toml" TIDEMARK__SYNC__MAPPING="$tmp/mapping.toml" \
  TIDEMARK__STATE_DIR="$tmp/state" "$TIDEMARK_BIN" check-config >/dev/null
echo "deploy/kubernetes: valid for Kubernetes ${VERSIONS[*]}; ConfigMap in sync and accepted by check-config" >&2
