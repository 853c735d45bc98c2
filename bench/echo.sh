#!/usr/bin/env bash
# Benchmark: tapir echo against the kernel answering ping, side by side in one run.
#
#   ns "tapir":  tun0 10.9.0.1/24, tapir echo answers 10.9.0.2   (userspace, one read + one write per ping)
#   ns "kernel": veth 10.10.0.1/24 <-> ns "peer" 10.10.0.2/24      (the kernel's own ICMP echo)
#
# For each: flood ping (one request in flight) -> replies/s; flood with 64 in
# flight -> replies/s; 2000 paced pings -> RTT p50/p90/p99. Prints a table with
# tapir's ratio to the kernel. Bounded: every ping has a count and a deadline.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || { echo "bench/echo.sh: needs root (network namespaces): sudo $0" >&2; exit 1; }
for c in ip ping; do command -v $c >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 iputils-ping >/dev/null; break; }; done

N=${N:-50000}
cargo build --release --locked -q -p tapir
tapir=$PWD/target/release/tapir
tag=tapir-bench-$$
a=$tag-a; k=$tag-k; p=$tag-p
echo_pid=
cleanup() {
    [[ -n $echo_pid ]] && kill "$echo_pid" 2>/dev/null && wait "$echo_pid" 2>/dev/null
    for n in $a $k $p; do ip netns del "$n" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

for n in $a $k $p; do ip netns add "$n"; ip -n "$n" link set lo up; done
ip netns exec $a sysctl -qw net.ipv6.conf.default.router_solicitations=0
ip netns exec $a "$tapir" echo tun0 --addr 10.9.0.1/24 > /tmp/$tag-echo.out 2>&1 &
echo_pid=$!
ip -n $k link add v0 type veth peer name v1 netns $p
ip -n $k addr add 10.10.0.1/24 dev v0; ip -n $p addr add 10.10.0.2/24 dev v1
ip -n $k link set v0 up; ip -n $p link set v1 up
for _ in $(seq 100); do ip -n $a link show tun0 2>/dev/null | grep -q LOWER_UP && break; sleep 0.05; done
ip netns exec $a ping -c 3 -W 1 -q 10.9.0.2 >/dev/null
ip netns exec $k ping -c 3 -W 1 -q 10.10.0.2 >/dev/null

# rate NS DST [extra ping args]: replies per second of a bounded flood.
rate() {
    local out rx ms
    out=$(ip netns exec "$1" ping -f -q -c "$N" -w 120 "${@:3}" "$2")
    rx=$(sed -n 's/.* \([0-9]*\) received.*/\1/p' <<<"$out")
    ms=$(sed -n 's/.*, time \([0-9]*\)ms.*/\1/p' <<<"$out")
    echo $(( rx * 1000 / (ms > 0 ? ms : 1) ))
}
# rtt NS DST: p50 p90 p99 of 2000 pings 1 ms apart, in microseconds.
rtt() {
    ip netns exec "$1" ping -c 2000 -i 0.001 -w 60 "$2" |
        sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' | sort -n |
        awk '{v[NR]=$1*1000} END {printf "%d %d %d\n", v[int(NR*0.5)], v[int(NR*0.9)], v[int(NR*0.99)]}'
}

echo "measuring ($N pings per flood)..."
t1=$(rate $a 10.9.0.2); k1=$(rate $k 10.10.0.2)
t64=$(rate $a 10.9.0.2 -l 64); k64=$(rate $k 10.10.0.2 -l 64)
read -r tp50 tp90 tp99 <<<"$(rtt $a 10.9.0.2)"
read -r kp50 kp90 kp99 <<<"$(rtt $k 10.10.0.2)"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }

printf '\n%-28s %14s %14s %8s\n' "" "tapir echo" "kernel (veth)" "ratio"
printf '%-28s %14s %14s %8s\n' "replies/s, 1 in flight" "$t1" "$k1" "$(ratio $t1 $k1)"
printf '%-28s %14s %14s %8s\n' "replies/s, 64 in flight" "$t64" "$k64" "$(ratio $t64 $k64)"
printf '%-28s %14s %14s %8s\n' "RTT p50 (us)" "$tp50" "$kp50" "$(ratio $tp50 $kp50)"
printf '%-28s %14s %14s %8s\n' "RTT p90 (us)" "$tp90" "$kp90" "$(ratio $tp90 $kp90)"
printf '%-28s %14s %14s %8s\n' "RTT p99 (us)" "$tp99" "$kp99" "$(ratio $tp99 $kp99)"
kill -TERM "$echo_pid"; wait "$echo_pid" || true; echo_pid=
echo; echo "tapir echo counters: $(cat /tmp/$tag-echo.out | tail -1)"
rm -f /tmp/$tag-echo.out
