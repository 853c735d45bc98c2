#!/usr/bin/env bash
# Benchmark: iperf3 TCP through tapir and through wireguard-go, side by side in
# one run, on the same two-namespace testbed (veth MTU 1500), plus the raw veth.
#
#   ns a: va 10.201.0.1 ── veth ── vb 10.201.0.2 :ns b
#         tunnel 10.78.0.1 ═══════ tunnel 10.78.0.2
#
# SECONDS_PER_RUN (default 10) per measurement; STREAMS (default "1 4").
# Peers that cannot be set up are reported as such, not left out.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || { echo "bench/tunnel.sh: needs root (network namespaces): sudo $0" >&2; exit 1; }
need=()
command -v iperf3 >/dev/null || need+=(iperf3)
command -v wireguard-go >/dev/null || need+=(wireguard-go)
command -v wg >/dev/null || need+=(wireguard-tools)
if ((${#need[@]})); then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
T=${SECONDS_PER_RUN:-10}
STREAMS=${STREAMS:-"1 4"}
cargo build --release --locked -q -p tapir
tapir=$PWD/target/release/tapir
tag=tb$$
a=$tag-a; b=$tag-b
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del $a 2>/dev/null || true; ip netns del $b 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

fresh() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
    ip netns del $a 2>/dev/null || true; ip netns del $b 2>/dev/null || true
    ip netns add $a; ip netns add $b
    for n in $a $b; do
        ip -n $n link set lo up
        ip netns exec $n sysctl -qw net.ipv6.conf.all.disable_ipv6=1
    done
    ip -n $a link add va type veth peer name vb netns $b
    ip -n $a addr add 10.201.0.1/24 dev va; ip -n $b addr add 10.201.0.2/24 dev vb
    ip -n $a link set va up; ip -n $b link set vb up
}

# iperf NSCLIENT SERVER_ADDR STREAMS -> Gbit/s
iperf() {
    ip netns exec $b iperf3 -s -1 -B "$2" >/dev/null 2>&1 & local sp=$!
    sleep 0.3
    local bps
    bps=$(ip netns exec $1 iperf3 -c "$2" -t "$T" -P "$3" -J 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])' 2>/dev/null || echo 0)
    wait $sp 2>/dev/null || true
    awk -v b="$bps" 'BEGIN { printf "%.2f", b / 1e9 }'
}

keys() { "$tapir" genkey; }
pub() { echo "$1" | "$tapir" pubkey; }

setup_tapir() {
    local ka kb; ka=$(keys); kb=$(keys)
    for side in a b; do
        local me peer addr other ns key
        if [[ $side == a ]]; then key=$ka; peer=$(pub "$kb"); addr=10.78.0.1; other=10.201.0.2; ns=$a; allowed=10.78.0.2/32
        else key=$kb; peer=$(pub "$ka"); addr=10.78.0.2; other=10.201.0.1; ns=$b; allowed=10.78.0.1/32; fi
        printf '[Interface]\nPrivateKey = %s\nListenPort = 51820\nAddress = %s/24\n[Peer]\nPublicKey = %s\nEndpoint = %s:51820\nAllowedIPs = %s\n' \
            "$key" "$addr" "$peer" "$other" "$allowed" > "$work/tb$side.conf"
        chmod 600 "$work/tb$side.conf"
        ip netns exec $ns "$tapir" run "$work/tb$side.conf" 2>/dev/null & pids+=($!)
    done
    sleep 0.5
    ip netns exec $a ping -c 2 -W 2 -q 10.78.0.2 >/dev/null
}

setup_wggo() {
    local ka kb; ka=$(keys); kb=$(keys)
    echo "$ka" > "$work/ka"; echo "$kb" > "$work/kb"; chmod 600 "$work/ka" "$work/kb"
    local i=0
    for ns in $a $b; do
        i=$((i + 1))
        ip netns exec $ns env WG_PROCESS_FOREGROUND=1 wireguard-go -f wgb$tag$i >/dev/null 2>&1 & pids+=($!)
    done
    sleep 0.5
    ip netns exec $a wg set wgb${tag}1 private-key "$work/ka" listen-port 51820 peer "$(pub "$kb")" allowed-ips 10.78.0.2/32 endpoint 10.201.0.2:51820
    ip netns exec $b wg set wgb${tag}2 private-key "$work/kb" listen-port 51820 peer "$(pub "$ka")" allowed-ips 10.78.0.1/32 endpoint 10.201.0.1:51820
    ip -n $a addr add 10.78.0.1/24 dev wgb${tag}1; ip -n $b addr add 10.78.0.2/24 dev wgb${tag}2
    ip -n $a link set wgb${tag}1 mtu 1420 up; ip -n $b link set wgb${tag}2 mtu 1420 up
    ip netns exec $a ping -c 2 -W 2 -q 10.78.0.2 >/dev/null
}

declare -A R
for s in $STREAMS; do
    fresh; R[veth,$s]=$(iperf $a 10.201.0.2 $s)
    fresh; if setup_tapir; then R[tapir,$s]=$(iperf $a 10.78.0.2 $s); else R[tapir,$s]="failed"; fi
    fresh; if setup_wggo; then R[wggo,$s]=$(iperf $a 10.78.0.2 $s); else R[wggo,$s]="failed"; fi
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0) printf "%.2f", a / b; else print "-" }'; }
printf '\niperf3 TCP, %ss per run, Gbit/s\n' "$T"
printf '%-10s %10s %14s %10s %14s %14s\n' streams "raw veth" wireguard-go tapir "tapir/wg-go" "tapir/veth"
for s in $STREAMS; do
    printf '%-10s %10s %14s %10s %14s %14s\n' "$s" "${R[veth,$s]}" "${R[wggo,$s]}" "${R[tapir,$s]}" \
        "$(ratio "${R[tapir,$s]}" "${R[wggo,$s]}")" "$(ratio "${R[tapir,$s]}" "${R[veth,$s]}")"
done
