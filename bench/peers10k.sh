#!/usr/bin/env bash
# A tunnel with 10,000 peers: how long it takes to start, how much memory it
# holds, and what one active peer moves through it, against the same tunnel
# with that one peer only, in one run:
#
#   ns a: va 10.203.0.1 ── veth ── vb 10.203.0.2 :ns b
#         one peer 10.90.0.1  ════  10.90.255.254/16, 10,000 peers (10.90.x.y/32)
#
# The 9,999 idle peers have random public keys (they never speak); the
# server routes the /16 through its address's prefix route (routes = []).
# Then, with the 10,000 peers, pings through the active peer (1,000, 2 ms
# apart), quiet and while `wg show` and `tapir status` of the server run
# in a loop: what the statuses of 10,000 peers cost its packets. The
# tunnel processes are then on CPU 1, the status commands on CPU 0, so
# that the commands' own work (formatting 10,000 peers) does not take the
# tunnel's CPU: what shows is the tunnel's. Likewise while `wg set`
# removes an idle peer and gives it back, and while `wg syncconf` gives
# the whole configuration again, in a loop: what changes cost.
# SECONDS_PER_RUN (default 10).
set -uo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || { echo "bench/peers10k.sh: needs root (network namespaces): sudo $0" >&2; exit 1; }
T=${SECONDS_PER_RUN:-10}
for pair in iperf3:iperf3 python3:python3 ping:iputils-ping wg:wireguard-tools; do
    command -v "${pair%%:*}" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pair#*:}" >/dev/null
done
# TAPIR: another build of tapir to measure (default: this tree's, built).
if [[ -n ${TAPIR:-} ]]; then tapir=$(realpath "$TAPIR"); else
    cargo build --release --locked -q -p tapir || exit 1
    tapir=$PWD/target/release/tapir
fi
tag=pk$$; a=$tag-a; b=$tag-b
work=$(mktemp -d)
pids=()
stop_all() { local p; for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done; pids=(); }
cleanup() { stop_all; ip netns del $a 2>/dev/null; ip netns del $b 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT INT TERM
ip netns add $a && ip netns add $b
for n in $a $b; do ip -n $n link set lo up; done
ip -n $a link add va type veth peer name vb netns $b
ip -n $a addr add 10.203.0.1/24 dev va; ip -n $b addr add 10.203.0.2/24 dev vb
ip -n $a link set va up; ip -n $b link set vb up

ka=$("$tapir" genkey); kb=$("$tapir" genkey)
pa=$(echo "$ka" | "$tapir" pubkey); pb=$(echo "$kb" | "$tapir" pubkey)
# server.toml with N peers: the real one first, then random keys.
server() {
    python3 - "$1" "$kb" "$pa" > "$work/s$1.toml" <<'PY'
import base64, os, sys
n, key, real = int(sys.argv[1]), sys.argv[2], sys.argv[3]
print(f'[[tunnel]]\nname = "pks"\nprivate_key = "{key}"\nlisten_port = 51820\naddresses = ["10.90.255.254/16"]\nroutes = []\n')
print(f'[[tunnel.peer]]\npublic_key = "{real}"\nallowed_ips = ["10.90.0.1/32"]\n')
for i in range(1, n):
    k = base64.b64encode(os.urandom(32)).decode()
    print(f'[[tunnel.peer]]\npublic_key = "{k}"\nallowed_ips = ["10.90.{i // 250}.{i % 250 + 2}/32"]\n')
PY
    chmod 600 "$work/s$1.toml"
}
printf '[Interface]\nPrivateKey = %s\nAddress = 10.90.0.1/16\n[Peer]\nPublicKey = %s\nEndpoint = 10.203.0.2:51820\nAllowedIPs = 10.90.255.254/32\n' "$ka" "$pb" > "$work/pka.conf"
chmod 600 "$work/pka.conf"

declare -A start rss gbps
for n in 1 10000; do
    stop_all
    server $n
    t0=$(date +%s.%N)
    ip netns exec $b "$tapir" run "$work/s$n.toml" 2>"$work/s$n.log" & spid=$!; pids+=($spid)
    # Started: the control socket answers.
    # (from the tunnel's namespace: a tunnel answers no other)
    up=
    for _ in $(seq 400); do
        ip netns exec $b wg show pks >/dev/null 2>&1 && { up=1; break; }
        sleep 0.01
    done
    t1=$(date +%s.%N)
    start[$n]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f ms", (b - a) * 1000 }')
    [[ -n $up ]] || start[$n]="no answer in ${start[$n]}: $(tail -1 "$work/s$n.log")"
    ip netns exec $a "$tapir" run "$work/pka.conf" 2>"$work/pka.log" & apid=$!; pids+=($apid)
    sleep 0.5
    ip netns exec $a ping -c 2 -W 3 -q 10.90.255.254 >/dev/null 2>&1
    ip netns exec $b iperf3 -s -1 -B 10.90.255.254 >/dev/null 2>&1 & sp=$!
    sleep 0.3
    bps=$(timeout $((T + 20)) ip netns exec $a iperf3 -c 10.90.255.254 -t "$T" -J 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])' 2>/dev/null || echo 0)
    wait $sp 2>/dev/null
    gbps[$n]=$(awk -v b="$bps" 'BEGIN { printf "%.2f", b / 1e9 }')
    rss[$n]=$(awk '/VmRSS/ {printf "%.1f MiB", $2 / 1024}' /proc/$spid/status 2>/dev/null)
    if ((n == 10000)); then
        taskset -a -p -c 1 "$spid" >/dev/null; taskset -a -p -c 1 "$apid" >/dev/null
        rtt() { ip netns exec $a taskset -c 1 ping -c 1000 -i 0.002 -q 10.90.255.254 | awk -F'[/ ]' '/^rtt/ { printf "mean %.3f ms, max %.3f ms", $8, $9 }'; }
        quiet=$(rtt)
        ( end=$((SECONDS + 4)); k=0
          while ((SECONDS < end)); do
              taskset -c 0 ip netns exec $b wg show pks dump >/dev/null
              taskset -c 0 ip netns exec $b "$tapir" status pks >/dev/null 2>&1
              k=$((k + 1))
          done; echo $k >"$work/statuses" ) & lp=$!
        showing=$(rtt)
        wait $lp
        # Changes: an idle peer removed and given back, one `wg set` each.
        mapfile -t idle < <(awk -F'"' '/^public_key/ { if (++n > 1) print $2 }' "$work/s$n.toml" | head -200)
        mapfile -t ips < <(awk -F'"' '/^allowed_ips/ { if (++n > 1) print $2 }' "$work/s$n.toml" | head -200)
        ( end=$((SECONDS + 4)); k=0
          while ((SECONDS < end)); do
              j=$((k % ${#idle[@]}))
              taskset -c 0 ip netns exec $b wg set pks peer "${idle[j]}" remove
              taskset -c 0 ip netns exec $b wg set pks peer "${idle[j]}" allowed-ips "${ips[j]}"
              k=$((k + 1))
          done; echo $k >"$work/changes" ) & lp=$!
        changing=$(rtt)
        wait $lp
        left=$(ip netns exec $b wg show pks peers | wc -l)
        # The whole configuration again, unchanged: what a `wg syncconf`
        # of 10,000 peers costs.
        ip netns exec $b wg showconf pks >"$work/pks.conf"
        ( end=$((SECONDS + 4)); k=0
          while ((SECONDS < end)); do
              taskset -c 0 ip netns exec $b wg syncconf pks "$work/pks.conf"
              k=$((k + 1))
          done; echo $k >"$work/syncs" ) & lp=$!
        syncing=$(rtt)
        wait $lp
    fi
done
stop_all
printf '\nSame machine, same run; iperf3 TCP %s s, one stream, through the one active peer.\n\n' "$T"
printf '| peers | start (socket answers) | RSS after the transfer | Gbit/s |\n|---|---|---|---|\n'
for n in 1 10000; do printf '| %s | %s | %s | %s |\n' "$n" "${start[$n]}" "${rss[$n]}" "${gbps[$n]}"; done
awk -v a="${gbps[10000]}" -v b="${gbps[1]}" 'BEGIN { if (b > 0) printf "\n10,000 peers / 1 peer: %.2f\n", a / b }'
printf '\nPing through the 10,000-peer tunnel (1,000 pings 2 ms apart): quiet %s; while wg show and tapir status loop (%s pairs) %s\n' "$quiet" "$(cat "$work/statuses" 2>/dev/null)" "$showing"
printf 'while an idle peer is removed and given back by wg set in a loop (%s pairs; %s peers after) %s\n' "$(cat "$work/changes" 2>/dev/null)" "$left" "$changing"
printf 'while wg syncconf gives the 10,000 peers again, unchanged, in a loop (%s times) %s\n' "$(cat "$work/syncs" 2>/dev/null)" "$syncing"
