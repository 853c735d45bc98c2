#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need
# (Debian packages), then checks formatting and lints and runs every test.
# Tests that need root skip themselves with a one-line reason when not root.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v setpriv >/dev/null || need+=(util-linux)
command -v mknod >/dev/null || need+=(coreutils)
{ command -v sysctl && command -v kill; } >/dev/null || need+=(procps)
command -v wireguard-go >/dev/null || need+=(wireguard-go)
command -v wg >/dev/null || need+=(wireguard-tools)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v nft >/dev/null || need+=(nftables)
command -v python3 >/dev/null || need+=(python3)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[[ -e /usr/lib/ipxe/qemu/pxe-e1000.rom ]] || need+=(ipxe-qemu)
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "test.sh: missing ${need[*]}; run as root to install them" >&2
        exit 1
    fi
    echo "==> installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

for tool in cargo rustfmt cargo-clippy; do
    command -v "$tool" >/dev/null || {
        echo "test.sh: $tool is missing: install the Rust toolchain with rustfmt and clippy (rustup component add rustfmt clippy)" >&2
        exit 1
    }
done

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
log=$(mktemp)
skips=$(mktemp)
trap 'rm -f "$log" "$skips"' EXIT
# Tests that need root record their skips here (netlab::require_root).
export NETLAB_SKIP_LOG=$skips
status=0
cargo test --workspace --locked 2>&1 | tee "$log" || status=$?
# The tunnel tests once more with one thread for both directions, the
# datapath's other shape (a thread per direction is the default).
if ((status == 0)); then
    echo "==> the tunnel tests again, TAPIR_THREADS=1"
    TAPIR_THREADS=1 cargo test --locked -p tapir --test wg --test tap --test tcp 2>&1 | tee -a "$log" || status=$?
fi
# One closing line for the whole run (cargo prints one per test binary);
# root-only tests that skipped themselves are counted as skipped, not passed.
skipped=$(wc -l < "$skips")
awk -v k="$skipped" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped (%d ignored, %d needing root)\n", p - k, f, s + k, s, k }' "$log"
if ((status != 0)); then exit "$status"; fi
if [[ $(id -u) -eq 0 && $skipped -gt 0 ]]; then
    echo "test.sh: $skipped test(s) skipped for want of root while running as root:" >&2
    sort "$skips" >&2
    exit 1
fi
