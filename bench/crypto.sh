#!/usr/bin/env bash
# The crypto micro-benchmark: ChaCha20-Poly1305 seal and open in place with
# RustCrypto, ring (tapir's), aws-lc-rs and the system's OpenSSL 3, 100-byte,
# 1420-byte and 64 KiB inputs. aws-lc-rs builds C with cmake, the openssl crate
# links libssl (cmake, pkgconf and libssl-dev installed here when missing).
set -euo pipefail
cd "$(dirname "$0")/crypto"
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v pkg-config >/dev/null || need+=(pkgconf)
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
if ((${#need[@]})); then
    echo "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Default flags, as tapir is built: each crate detects AVX2 and friends at run time.
cargo run --release -q
