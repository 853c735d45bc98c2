#!/usr/bin/env bash
# The crypto micro-benchmark: ChaCha20-Poly1305 seal and open in place with
# RustCrypto, ring (tapir's) and aws-lc-rs, 100-byte, 1420-byte and 64 KiB inputs.
# aws-lc-rs builds C with cmake (installed here when missing).
set -euo pipefail
cd "$(dirname "$0")/crypto"
command -v cmake >/dev/null || { echo "installing cmake"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cmake >/dev/null; }
# Default flags, as tapir is built: each crate detects AVX2 and friends at run time.
cargo run --release -q
