#!/usr/bin/env bash
# The main job: check the machine (tapir doctor), then the lab (tapir demo):
# two network namespaces, a tapir tunnel between them, a ping and a short
# throughput figure through it, everything removed afterwards. Each step is
# printed with the commands a user would type.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "main-job.sh: needs root (creates network namespaces and a tunnel): sudo $0" >&2
    exit 1
fi
command -v ip >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
}

echo "==> building tapir"
cargo build --release --locked -q -p tapir
tapir=${CARGO_TARGET_DIR:-$PWD/target}/release/tapir

step() {
    echo
    echo "\$ $*"
    "$@"
}

step "$tapir" doctor || echo "(doctor found something missing; continuing)"
step "$tapir" demo
