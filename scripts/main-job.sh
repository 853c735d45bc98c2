#!/usr/bin/env bash
# The main job until the tunnel lands (then: tapir demo): check the machine,
# then create, configure, show and delete a tap device in a throw-away
# network namespace. Prints each command as a user would type it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "main-job.sh: needs root (creates a network namespace and a tap device): sudo $0" >&2
    exit 1
fi
command -v ip >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
}

echo "==> building tapir"
cargo build --release --locked -q -p tapir
tapir=$PWD/target/release/tapir

ns=tapir-main-$$
cleanup() { ip netns del "$ns" 2>/dev/null || true; }
trap cleanup EXIT INT TERM

step() {
    echo
    echo "\$ $*"
    "$@"
}

step "$tapir" doctor || echo "(doctor found something missing; continuing)"
echo
echo "==> a throw-away network namespace: $ns"
ip netns add "$ns"
in_ns() { step ip netns exec "$ns" "$tapir" "$@"; }
in_ns dev add tap%d --mode tap --user nobody --multi-queue --vnet-hdr
in_ns dev set tap0 --up --mtu 1400 --addr 10.99.0.1/24 --addr fd99::1/64 --route 10.98.0.0/16 --via 10.99.0.254
in_ns dev show tap0
in_ns dev list
in_ns dev del tap0
in_ns dev list
echo
echo "==> done: the namespace $ns is removed on exit"
