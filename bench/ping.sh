#!/usr/bin/env bash
# Ping RTT through every tunnel at once: each in its own pair of namespaces,
# all up together, their pings interleaved (ROUNDS rounds of COUNT pings
# INTERVAL apart to each in turn), so that a drift of the machine during the
# run falls on all of them alike. bench/peers.sh measures one tunnel after
# another; its ping medians move by up to 30% run to run, these by a few µs.
#
#   ns N-a: va 10.201.0.1 ── veth ── vb 10.201.0.2 :ns N-b     (one pair per tunnel)
#           tunnel 10.78.0.1 ═══════ tunnel 10.78.0.2
#
# Tunnels (PINGS, default all; spaces or commas): tapir, tapir_tap, tapir_tcp, vtun,
# vtun_ether, vtun_tcp (VTun without encryption), tapir_alt (the tapir binary
# at TAPIR_ALT, to compare two builds in one run), floor (bench/floor: the
# least an encrypting tunnel does, not a tunnel), boringtun (boringtun-cli);
# floor+CHOICE+... is the floor using the kernel as tapir does, one choice
# at a time (epoll, v6, recvmsg, gro, vnet, spare, block, connect; floor+tapir: what
# tapir does for a lone datagram, see bench/floor): what those cost a ping,
# apart from tapir's own work.
# Prints the median, 25th and 75th percentiles of each, and the mean of the
# middle 80% in µs (ping prints whole µs: the median moves in steps of one,
# the mean of thousands shows differences of a few tenths). Installs what is
# missing, as bench/peers.sh does.
#
# PIN=N runs everything (tunnels, pings, the kernel work they cause) on CPU
# N alone: no wake-up then crosses CPUs, and what is left is each tunnel's
# own work on the path, which moves far less from run to run (differences
# of 0.5 µs show) than the unpinned figures, where waking idle virtual
# CPUs is most of a ping.
set -uo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || { echo "bench/ping.sh: needs root (network namespaces): sudo $0" >&2; exit 1; }
if [[ -n ${PIN:-} && -z ${PINNED_TO:-} ]]; then
    PINNED_TO=$PIN exec taskset -c "$PIN" "$0" "$@"
fi
ROUNDS=${ROUNDS:-10}; COUNT=${COUNT:-200}; INTERVAL=${INTERVAL:-0.002}
export PATH="$HOME/.cargo/bin:$PATH"
need=()
for pair in vtund:vtun wg:wireguard-tools ping:iputils-ping; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if ((${#need[@]})); then
    echo "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v boringtun-cli >/dev/null || { echo "cargo install boringtun-cli"; cargo install --locked -q boringtun-cli || true; }
cargo build --release --locked -q -p tapir || exit 1
(cd bench/floor && cargo build --release --locked -q) || exit 1
tapir=$PWD/target/release/tapir
floor=$PWD/bench/floor/target/release/tapir-floor
tag=bp$$
work=$(mktemp -d)
pids=(); spaces=()
cleanup() {
    local p n
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
    for n in "${spaces[@]}"; do ip netns del "$n" 2>/dev/null; done
    rm -f /var/run/wireguard/"$tag"*.sock
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# pair K: namespaces $tag-K-a and $tag-K-b joined by a veth.
pair() {
    local a=$tag-$1-a b=$tag-$1-b n
    ip netns add "$a" && ip netns add "$b" || return 1
    spaces+=("$a" "$b")
    for n in "$a" "$b"; do
        ip -n "$n" link set lo up
        ip netns exec "$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    done
    ip -n "$a" link add va type veth peer name vb netns "$b"
    ip -n "$a" addr add 10.201.0.1/24 dev va && ip -n "$b" addr add 10.201.0.2/24 dev vb
    ip -n "$a" link set va up && ip -n "$b" link set vb up
}

# tapir K EXTRA [BINARY]: a tapir pair with extra [Interface] lines.
tapir_up() {
    local k=$1 ka kb tapir=${3:-$tapir}
    ka=$("$tapir" genkey); kb=$("$tapir" genkey)
    printf '[Interface]\nPrivateKey = %s\nAddress = 10.78.0.1/24\n%b\n[Peer]\nPublicKey = %s\nEndpoint = 10.201.0.2:51820\nAllowedIPs = 10.78.0.2/32\n' \
        "$ka" "$2" "$(echo "$kb" | "$tapir" pubkey)" > "$work/t$k-a.conf"
    printf '[Interface]\nPrivateKey = %s\nListenPort = 51820\nAddress = 10.78.0.2/24\n%b\n[Peer]\nPublicKey = %s\nAllowedIPs = 10.78.0.1/32\n' \
        "$kb" "$2" "$(echo "$ka" | "$tapir" pubkey)" > "$work/t$k-b.conf"
    chmod 600 "$work"/t"$k"-?.conf
    ip netns exec "$tag-$k-b" "$tapir" run "$work/t$k-b.conf" 2>"$work/t$k-b.log" & pids+=($!)
    sleep 0.3
    ip netns exec "$tag-$k-a" "$tapir" run "$work/t$k-a.conf" 2>"$work/t$k-a.log" & pids+=($!)
}

# vtun K TYPE PROTO: VTun without encryption.
vtun_up() {
    local k=$1 side me addr ip; ip=$(command -v ip)
    for side in b a; do
        if [[ $side == b ]]; then me=10.78.0.2; else me=10.78.0.1; fi
        # vtund's parser wants a space before each ';' after a quoted argument.
        cat > "$work/v$k-$side.conf" <<CONF
options { port 5000; ip $ip; timeout 10; }
default { compress no; speed 0; }
demo {
  passwd benchsecret; type $2; proto $3; encrypt no; keepalive yes; stat no;
  up {
    ip "addr add $me/24 dev %%" ;
    ip "link set %% mtu 1450 up" ;
  };
}
CONF
    done
    ip netns exec "$tag-$k-b" vtund -s -n -f "$work/v$k-b.conf" >"$work/v$k-b.log" 2>&1 & pids+=($!)
    sleep 0.5
    ip netns exec "$tag-$k-a" vtund -n -f "$work/v$k-a.conf" demo 10.201.0.2 >"$work/v$k-a.log" 2>&1 & pids+=($!)
}

# floor K [CHOICES]: the floor, using the kernel as FLOOR_WITH=CHOICES says.
floor_up() {
    local k=$1 s
    ip netns exec "$tag-$k-b" env FLOOR_WITH="${2:-}" "$floor" floor0 5555 10.201.0.1:5555 2>"$work/f$k-b.log" & pids+=($!)
    ip netns exec "$tag-$k-a" env FLOOR_WITH="${2:-}" "$floor" floor0 5555 10.201.0.2:5555 2>"$work/f$k-a.log" & pids+=($!)
    for _ in $(seq 50); do ip -n "$tag-$k-a" link show floor0 >/dev/null 2>&1 && ip -n "$tag-$k-b" link show floor0 >/dev/null 2>&1 && break; sleep 0.1; done
    for s in a b; do
        ip -n "$tag-$k-$s" addr add 10.78.0."$([[ $s == a ]] && echo 1 || echo 2)"/24 dev floor0
        ip -n "$tag-$k-$s" link set floor0 mtu 1420 up
    done
}

boringtun_up() {
    local k=$1 ka kb s n
    command -v boringtun-cli >/dev/null || return 1
    ka=$("$tapir" genkey); kb=$("$tapir" genkey)
    echo "$ka" > "$work/bk$k-a"; echo "$kb" > "$work/bk$k-b"; chmod 600 "$work"/bk"$k"-?
    for s in a b; do
        n=$tag$k$s
        ip netns exec "$tag-$k-$s" env WG_LOG_LEVEL=error boringtun-cli --foreground --disable-drop-privileges "$n" >"$work/b$k-$s.log" 2>&1 & pids+=($!)
    done
    for s in a b; do for _ in $(seq 100); do [[ -S /var/run/wireguard/$tag$k$s.sock ]] && break; sleep 0.05; done; done
    ip netns exec "$tag-$k-a" wg set "${tag}${k}a" private-key "$work/bk$k-a" listen-port 51820 peer "$(echo "$kb" | "$tapir" pubkey)" allowed-ips 10.78.0.2/32 endpoint 10.201.0.2:51820 &&
    ip netns exec "$tag-$k-b" wg set "${tag}${k}b" private-key "$work/bk$k-b" listen-port 51820 peer "$(echo "$ka" | "$tapir" pubkey)" allowed-ips 10.78.0.1/32 endpoint 10.201.0.1:51820 || return 1
    for s in a b; do
        ip -n "$tag-$k-$s" addr add 10.78.0."$([[ $s == a ]] && echo 1 || echo 2)"/24 dev "$tag$k$s"
        ip -n "$tag-$k-$s" link set "$tag$k$s" mtu 1420 up
    done
}

tunnels=${PINGS:-"tapir vtun floor floor+tapir boringtun tapir_tap vtun_ether tapir_tcp vtun_tcp"}
tunnels=${tunnels//,/ }
declare -A label=([tapir]=tapir [tapir_tap]="tapir tap" [tapir_tcp]="tapir TCP" [vtun]="VTun (no crypto)"
    [vtun_ether]="VTun ether (no crypto)" [vtun_tcp]="VTun TCP (no crypto)" [floor]="encrypting floor" [boringtun]=boringtun-cli
    [tapir_alt]="tapir (TAPIR_ALT)")
for t in $tunnels; do
    [[ $t == tapir_alt && ! -x ${TAPIR_ALT:-} ]] && { echo "bench/ping.sh: tapir_alt needs TAPIR_ALT, the path of another tapir binary to compare" >&2; exit 2; }
    [[ $t == floor+* ]] && label[$t]="floor ${t#floor}"
    [[ -n ${label[$t]:-} ]] || { echo "bench/ping.sh: PINGS names an unknown tunnel '$t'; known: ${!label[*]}" >&2; exit 2; }
done
up=(); k=0
for t in $tunnels; do
    k=$((k + 1))
    pair $k || { echo "$t: namespaces failed" >&2; continue; }
    case $t in
        tapir) tapir_up $k "" ;;
        tapir_tap) tapir_up $k "Mode = tap" ;;
        tapir_tcp) tapir_up $k "Transport = tcp" ;;
        tapir_alt) tapir_up $k "" "$TAPIR_ALT" ;;
        vtun) vtun_up $k tun udp ;;
        vtun_ether) vtun_up $k ether udp ;;
        vtun_tcp) vtun_up $k tun tcp ;;
        floor) floor_up $k ;;
        floor+*) floor_up $k "${t#floor+}" ;;
        boringtun) boringtun_up $k ;;
    esac
    up+=("$k:$t")
done
ok=()
for e in "${up[@]}"; do
    k=${e%%:*}
    for _ in $(seq 100); do ip netns exec "$tag-$k-a" ping -c 1 -W 1 -q 10.78.0.2 >/dev/null 2>&1 && { ok+=("$e"); break; }; sleep 0.2; done
done
for _ in $(seq "$ROUNDS"); do
    for e in "${ok[@]}"; do
        k=${e%%:*}
        ip netns exec "$tag-$k-a" ping -c "$COUNT" -i "$INTERVAL" 10.78.0.2 2>/dev/null | sed -n 's/.*time=\([0-9.]*\).*/\1/p' >> "$work/rtt.$k"
    done
done
printf '\nping RTT, ms: %s rounds of %s pings %s s apart to each tunnel in turn, all up at once%s\n\n' "$ROUNDS" "$COUNT" "$INTERVAL" "${PINNED_TO:+, all on CPU $PINNED_TO}"
printf '| %-22s | %6s | %6s | %6s | %9s | %6s\n' tunnel p25 median p75 "mean µs" pings
printf '|%s|%s|%s|%s|%s|%s\n' "------------------------" "--------" "--------" "--------" "----------" "------"
for t in $tunnels; do
    e=; for x in "${ok[@]}"; do [[ ${x#*:} == "$t" ]] && e=$x; done
    if [[ -z $e ]]; then printf '| %-22s | not measured: did not carry a ping\n' "${label[$t]}"; continue; fi
    sort -n "$work/rtt.${e%%:*}" | awk -v l="${label[$t]}" '{ v[NR] = $1 } END {
        for (i = int(NR / 10) + 1; i <= int(NR * 9 / 10); i++) { sum += v[i]; n++ }
        printf "| %-22s | %6.3f | %6.3f | %6.3f | %8.2f | %6d\n", l, v[int(NR / 4) + 1], v[int((NR + 1) / 2)], v[int(NR * 3 / 4)], sum / n * 1000, NR
        printf "%.2f", sum / n * 1000 > m }' m="$work/mean.$t"
done
# tapir against the others, on the means above.
mean() { cat "$work/mean.$1" 2>/dev/null; }
if [[ -n $(mean tapir) ]]; then
    echo
    for t in tapir_alt vtun floor+tapir floor boringtun; do
        [[ -n $(mean "$t") ]] && awk -v a="$(mean tapir)" -v b="$(mean "$t")" -v l="${label[$t]}" \
            'BEGIN { printf "tapir - %s: %+.2f µs (%+.1f%%)\n", l, a - b, (a - b) / b * 100 }'
    done
    [[ -n $(mean floor+tapir) ]] && echo "(floor +tapir: the floor using the kernel as tapir does, so that the difference is tapir's own work)"
fi
