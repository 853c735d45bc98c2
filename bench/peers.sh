#!/usr/bin/env bash
# The peer benchmark: iperf3 TCP (1 and 4 streams) and ping RTT through the raw
# veth, tapir, wireguard-go, boringtun-cli, gotatun-cli, OpenVPN (UDP,
# AES-256-GCM, p2p TLS), VTun (UDP, no encryption) and the encrypting floor
# (bench/floor: not a tunnel, the least encrypting costs); then Ethernet tunnels
# (tapir tap, OpenVPN dev tap, tinc Mode = switch, VTun type ether) and
# tunnels over TCP (tapir, OpenVPN proto tcp, VTun proto tcp), measured one
# after another in one run on the same testbed:
#
#   ns a: va 10.201.0.1 ── veth (MTU 1500) ── vb 10.201.0.2 :ns b
#         tunnel 10.78.0.1 ══════════════════ tunnel 10.78.0.2
#
# Prints a table with each figure (throughput, ping alone and during the
# 1-stream transfer, the wake-ups per second of an idle tunnel, and the CPU it
# takes to carry a stream at a set rate), tapir's ratio to the best userspace peer and
# to the raw veth, and tapir's RSS and CPU; then the pings once more, the
# tunnels up at once and interleaved (bench/ping.sh). A peer that cannot be set up is
# reported with the reason. Installs what is missing (Debian packages; the two
# Rust peers with cargo install). SECONDS_PER_RUN (default 10).
set -uo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || { echo "bench/peers.sh: needs root (network namespaces): sudo $0" >&2; exit 1; }
T=${SECONDS_PER_RUN:-10}
export PATH="$HOME/.cargo/bin:$PATH"
need=()
for pair in iperf3:iperf3 wireguard-go:wireguard-go wg:wireguard-tools openvpn:openvpn vtund:vtun tincd:tinc openssl:openssl ping:iputils-ping python3:python3; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if ((${#need[@]})); then
    echo "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# crate:binary (gotatun-cli installs a binary called gotatun)
for pair in boringtun-cli:boringtun-cli gotatun-cli:gotatun; do
    command -v "${pair#*:}" >/dev/null || { echo "cargo install ${pair%%:*}"; cargo install --locked -q "${pair%%:*}" || true; }
done
cargo build --release --locked -q -p tapir || exit 1
tapir=$PWD/target/release/tapir
tag=pb$$
a=$tag-a; b=$tag-b
work=$(mktemp -d)
pids=()
stop_all() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
    pids=()
    # Userspace WireGuard daemons that leave their control sockets behind.
    rm -f /var/run/wireguard/*"$tag"[12].sock
}
cleanup() { stop_all; ip netns del $a 2>/dev/null; ip netns del $b 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT INT TERM

fresh() {
    local n
    stop_all
    ip netns del $a 2>/dev/null; ip netns del $b 2>/dev/null
    ip netns add $a && ip netns add $b
    for n in $a $b; do
        ip -n $n link set lo up
        ip netns exec $n sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    done
    ip -n $a link add va type veth peer name vb netns $b
    ip -n $a addr add 10.201.0.1/24 dev va; ip -n $b addr add 10.201.0.2/24 dev vb
    ip -n $a link set va up; ip -n $b link set vb up
}

reachable() { ip netns exec $a ping -c 1 -W 2 -q "$1" >/dev/null 2>&1 || ip netns exec $a ping -c 2 -W 3 -q "$1" >/dev/null 2>&1; }

# wakes -> wake-ups per second of the tunnel's processes (both ends, every
# thread, forked children: voluntary context switches) over IDLE_SECONDS
# (default 5) without traffic: what an idle tunnel costs a laptop's battery.
IDLE=${IDLE_SECONDS:-5}
# tunnel_procs -> the tunnel's processes (both ends, forked children too) in $procs.
tunnel_procs() {
    local p c
    procs=()
    for p in "${pids[@]}"; do procs+=("$p"); for c in $(pgrep -P "$p"); do procs+=("$c"); done; done
}
wakes() {
    local procs p
    tunnel_procs
    ((${#procs[@]})) || return 0
    count() {
        for p in "${procs[@]}"; do cat /proc/"$p"/task/*/status 2>/dev/null; done |
            awk '/^voluntary_ctxt_switches/ { s += $2 } END { print s + 0 }'
    }
    local w0 w1; w0=$(count); sleep "$IDLE"; w1=$(count)
    awk -v a="$w0" -v b="$w1" -v t="$IDLE" 'BEGIN { printf "%.1f", (b - a) / t }'
}

# iperf STREAMS DST [FILE] [RATE] -> Gbit/s (0.00 on failure). With FILE, DST is
# pinged every 10 ms during the transfer (from its second second to its
# last) and the median written there, in ms: what a ping (a call, a game)
# waits behind the transfer's queues. With RATE (iperf3's -b, 500M), the
# sender keeps to it.
iperf() {
    ip netns exec $b iperf3 -s -1 -B "$2" >/dev/null 2>&1 & local sp=$!
    sleep 0.3
    local bps pp=
    if [[ -n ${3:-} ]]; then
        (sleep 1; ip netns exec $a ping -c $(((T - 2) * 100)) -i 0.01 "$2" 2>/dev/null | sed -n 's/.*time=\([0-9.]*\).*/\1/p' | sort -n |
            awk '{ v[NR] = $1 } END { if (NR) printf "%.3f", v[int((NR + 1) / 2)] }' > "$3") & pp=$!
    fi
    bps=$(timeout $((T + 20)) ip netns exec $a iperf3 -c "$2" -t "$T" -P "$1" ${4:+-b "$4"} -J 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])' 2>/dev/null || echo 0)
    [[ -n $pp ]] && wait $pp 2>/dev/null
    kill $sp 2>/dev/null; wait $sp 2>/dev/null
    awk -v b="$bps" 'BEGIN { printf "%.2f", b / 1e9 }'
}
# rtt DST -> the median of 1000 pings 2 ms apart, in ms (a mean would be
# the scheduler's outliers as much as the tunnel's own time).
rtt() {
    ip netns exec $a ping -c 1000 -i 0.002 "$1" 2>/dev/null | sed -n 's/.*time=\([0-9.]*\).*/\1/p' | sort -n |
        awk '{ v[NR] = $1 } END { if (NR) printf "%.3f", v[int((NR + 1) / 2)] }'
}

# cost DST -> the CPU the tunnel's processes (both ends) spend to carry one
# stream at RATE_MBIT (default 500) Mbit/s, in % of one core per Gbit/s
# carried (what a tunnel costs where the link, not the CPU, sets the rate:
# a laptop, a server's other work). A peer slower than the rate is
# measured at its own rate. Empty without processes (the raw veth).
RATE_MBIT=${RATE_MBIT:-500}
cost() {
    local procs p t0 t1 g
    tunnel_procs
    ((${#procs[@]})) || return 0
    ticks() { for p in "${procs[@]}"; do awk '{ print $14 + $15 }' /proc/"$p"/stat 2>/dev/null; done | awk '{ s += $1 } END { print s + 0 }'; }
    t0=$(ticks)
    g=$(iperf 1 "$1" "" "${RATE_MBIT}M")
    t1=$(ticks)
    # Over the transfer's T seconds: the tunnel idles around it.
    awk -v a="$t0" -v b="$t1" -v t="$T" -v g="$g" -v hz="$(getconf CLK_TCK)" \
        'BEGIN { if (g + 0 > 0) printf "%.1f", (b - a) / hz / t * 100 / g }'
}

keys() { "$tapir" genkey; }
pub() { echo "$1" | "$tapir" pubkey; }

# A userspace WireGuard daemon with the UAPI socket: NAME COMMAND...
uapi_pair() {
    local name=$1; shift
    local ka kb ns; ka=$(keys); kb=$(keys)
    echo "$ka" > "$work/ka"; echo "$kb" > "$work/kb"; chmod 600 "$work/ka" "$work/kb"
    local i=0
    for ns in $a $b; do
        i=$((i + 1))
        ip netns exec $ns "$@" "$name$i" >"$work/$name$i.log" 2>&1 & pids+=($!)
    done
    for i in 1 2; do
        for _ in $(seq 100); do [[ -S /var/run/wireguard/$name$i.sock ]] && break; sleep 0.05; done
    done
    ip netns exec $a wg set ${name}1 private-key "$work/ka" listen-port 51820 peer "$(pub "$kb")" allowed-ips 10.78.0.2/32 endpoint 10.201.0.2:51820 || return 1
    ip netns exec $b wg set ${name}2 private-key "$work/kb" listen-port 51820 peer "$(pub "$ka")" allowed-ips 10.78.0.1/32 endpoint 10.201.0.1:51820 || return 1
    ip -n $a addr add 10.78.0.1/24 dev ${name}1 && ip -n $b addr add 10.78.0.2/24 dev ${name}2 || return 1
    ip -n $a link set ${name}1 mtu 1420 up && ip -n $b link set ${name}2 mtu 1420 up || return 1
}

setup_veth() { DST=10.201.0.2; }
# tapir with extra [Interface] lines ($1) and a /24 on each side.
tapir_pair() {
    DST=10.78.0.2
    local ka kb; ka=$(keys); kb=$(keys)
    printf '[Interface]\nPrivateKey = %s\nAddress = 10.78.0.1/24\n%b\n[Peer]\nPublicKey = %s\nEndpoint = 10.201.0.2:51820\nAllowedIPs = 10.78.0.2/32\n' "$ka" "$1" "$(pub "$kb")" > "$work/tpa.conf"
    printf '[Interface]\nPrivateKey = %s\nListenPort = 51820\nAddress = 10.78.0.2/24\n%b\n[Peer]\nPublicKey = %s\nAllowedIPs = 10.78.0.1/32\n' "$kb" "$1" "$(pub "$ka")" > "$work/tpb.conf"
    chmod 600 "$work"/tp?.conf
    ip netns exec $b env TAPIR_UDP_GSO="${TAPIR_UDP_GSO:-on}" TAPIR_UDP_GRO="${TAPIR_UDP_GRO:-on}" "$tapir" run "$work/tpb.conf" 2>"$work/tpb.log" & pids+=($!)
    sleep 0.3
    ip netns exec $a env TAPIR_UDP_GSO="${TAPIR_UDP_GSO:-on}" TAPIR_UDP_GRO="${TAPIR_UDP_GRO:-on}" "$tapir" run "$work/tpa.conf" 2>"$work/tpa.log" & pids+=($!); TAPIR_PID=$!
    sleep 0.5
}
setup_tapir() { tapir_pair ""; }
# The same without UDP segmentation and coalescing, to show what they bring.
setup_tapir_nouo() { TAPIR_UDP_GSO=off TAPIR_UDP_GRO=off tapir_pair ""; }
setup_tapir_nogso() { TAPIR_UDP_GSO=off tapir_pair ""; }
setup_tapir_nogro() { TAPIR_UDP_GRO=off tapir_pair ""; }
setup_tapir_1t() { TAPIR_THREADS=1 tapir_pair ""; }
setup_tapir_tap() { tapir_pair "Mode = tap"; }
setup_tapir_tcp() { tapir_pair "Transport = tcp"; }
setup_wggo() { DST=10.78.0.2; command -v wireguard-go >/dev/null || { WHY="wireguard-go not installed"; return 1; }; uapi_pair wgg$tag env WG_PROCESS_FOREGROUND=1 wireguard-go -f; }
setup_boringtun() { DST=10.78.0.2; command -v boringtun-cli >/dev/null || { WHY="boringtun-cli did not install"; return 1; }; uapi_pair bt$tag env WG_LOG_LEVEL=error boringtun-cli --foreground --disable-drop-privileges; }
setup_gotatun() { DST=10.78.0.2; command -v gotatun >/dev/null || { WHY="gotatun-cli did not install"; return 1; }; uapi_pair gt$tag env WG_LOG_LEVEL=error gotatun --foreground --disable-drop-privileges; }
# OpenVPN point to point with TLS, AES-256-GCM: DEV (tun|tap) PROTO (udp|tcp)
openvpn_pair() {
    DST=10.78.0.2
    command -v openvpn >/dev/null || { WHY="openvpn not installed"; return 1; }
    (cd "$work" &&
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=ca 2>/dev/null &&
        for s in a b; do
            openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout $s.key -out $s.csr -subj /CN=$s 2>/dev/null &&
            openssl x509 -req -in $s.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out $s.crt -days 2 2>/dev/null || exit 1
        done) || { WHY="openssl could not make certificates"; return 1; }
    local common=(--dev "$1" --data-ciphers AES-256-GCM --cipher AES-256-GCM --ca "$work/ca.crt" --disable-dco --verb 1 --ping 5)
    local server=(--proto "$2") client=(--proto "$2")
    [[ $2 == tcp ]] && server=(--proto tcp-server) && client=(--proto tcp-client)
    local ifb=(--ifconfig 10.78.0.2 10.78.0.1) ifa=(--ifconfig 10.78.0.1 10.78.0.2)
    [[ $1 == tap ]] && ifb=(--ifconfig 10.78.0.2 255.255.255.0) && ifa=(--ifconfig 10.78.0.1 255.255.255.0)
    ip netns exec $b openvpn "${common[@]}" "${server[@]}" --tls-server --dh none --cert "$work/b.crt" --key "$work/b.key" --lport 1194 "${ifb[@]}" >"$work/ovpn-b.log" 2>&1 & pids+=($!)
    sleep 0.3
    ip netns exec $a openvpn "${common[@]}" "${client[@]}" --tls-client --cert "$work/a.crt" --key "$work/a.key" --remote 10.201.0.2 1194 "${ifa[@]}" >"$work/ovpn-a.log" 2>&1 & pids+=($!)
    for _ in $(seq 100); do grep -q "Initialization Sequence Completed" "$work/ovpn-a.log" 2>/dev/null && return 0; sleep 0.1; done
    WHY="OpenVPN did not complete its TLS handshake: $(tail -1 "$work/ovpn-a.log")"; return 1
}
setup_openvpn() { openvpn_pair tun udp; }
setup_openvpn_tap() { openvpn_pair tap udp; }
setup_openvpn_tcp() { openvpn_pair tun tcp; }
# VTun without encryption: TYPE (tun|ether) PROTO (udp|tcp)
vtun_pair() {
    DST=10.78.0.2
    command -v vtund >/dev/null || { WHY="vtun not installed"; return 1; }
    local ip; ip=$(command -v ip)
    local side
    for side in b a; do
        local me peer addr; if [[ $side == b ]]; then me=10.78.0.2; peer=10.78.0.1; else me=10.78.0.1; peer=10.78.0.2; fi
        if [[ $1 == ether ]]; then addr="addr add $me/24 dev %%"; else addr="addr add $me peer $peer dev %%"; fi
        # vtund's parser wants a space before each ';' after a quoted argument.
        cat > "$work/vtun-$side.conf" <<CONF
options { port 5000; ip $ip; timeout 10; }
default { compress no; speed 0; }
demo {
  passwd benchsecret; type $1; proto $2; encrypt no; keepalive yes; stat no;
  up {
    ip "$addr" ;
    ip "link set %% mtu 1450 up" ;
  };
}
CONF
    done
    ip netns exec $b vtund -s -n -f "$work/vtun-b.conf" >"$work/vtun-b.log" 2>&1 & pids+=($!)
    sleep 0.5
    ip netns exec $a vtund -n -f "$work/vtun-a.conf" demo 10.201.0.2 >"$work/vtun-a.log" 2>&1 & pids+=($!)
    for _ in $(seq 100); do ip -n $a addr show 2>/dev/null | grep -q "10.78.0.1" && return 0; sleep 0.1; done
    WHY="VTun did not connect: $(tail -1 "$work/vtun-a.log")"; return 1
}
setup_vtun() { vtun_pair tun udp; }
setup_vtun_ether() { vtun_pair ether udp; }
setup_vtun_tcp() { vtun_pair tun tcp; }

# The encrypting floor (bench/floor): poll, read, seal, send; receive, open,
# write, and nothing else. Not a tunnel (a fixed key, no handshake): the
# least that encrypting costs, beside VTun that does not encrypt.
setup_floor() {
    DST=10.78.0.2
    (cd bench/floor && cargo build --release --locked -q) || { WHY="bench/floor did not build"; return 1; }
    local floor=$PWD/bench/floor/target/release/tapir-floor
    ip netns exec $b "$floor" floor0 5555 10.201.0.1:5555 2>"$work/floor-b.log" & pids+=($!)
    ip netns exec $a "$floor" floor0 5555 10.201.0.2:5555 2>"$work/floor-a.log" & pids+=($!)
    for _ in $(seq 50); do ip -n $a link show floor0 >/dev/null 2>&1 && ip -n $b link show floor0 >/dev/null 2>&1 && break; sleep 0.1; done
    ip -n $a addr add 10.78.0.1/24 dev floor0 && ip -n $b addr add 10.78.0.2/24 dev floor0 || { WHY="no floor0 device: $(tail -1 "$work/floor-a.log")"; return 1; }
    ip -n $a link set floor0 mtu 1420 up && ip -n $b link set floor0 mtu 1420 up
}

# tinc 1.0 in switch mode (Ethernet), its default cipher (Blowfish-CBC, SHA1).
setup_tinc() {
    DST=10.78.0.2
    command -v tincd >/dev/null || { WHY="tinc not installed"; return 1; }
    local n me other addr
    for n in a b; do mkdir -p "$work/tinc-$n/hosts"; done
    for n in a b; do
        if [[ $n == a ]]; then me=10.78.0.1; other=b; addr=10.201.0.1; else me=10.78.0.2; other=a; addr=10.201.0.2; fi
        printf 'Name = %s\nMode = switch\nDeviceType = tap\nInterface = tinc%s\nAddressFamily = ipv4\nConnectTo = %s\n' "$n" "$n" "$other" > "$work/tinc-$n/tinc.conf"
        printf 'Address = %s\nPort = 655\n' "$addr" > "$work/tinc-$n/hosts/$n"
        printf '#!/bin/sh\nip link set "$INTERFACE" mtu 1400 up\nip addr add %s/24 dev "$INTERFACE"\n' "$me" > "$work/tinc-$n/tinc-up"
        chmod +x "$work/tinc-$n/tinc-up"
        tincd -c "$work/tinc-$n" -K 2048 </dev/null >/dev/null 2>&1 || { WHY="tincd -K failed"; return 1; }
    done
    cp "$work/tinc-a/hosts/a" "$work/tinc-b/hosts/a"; cp "$work/tinc-b/hosts/b" "$work/tinc-a/hosts/b"
    for n in b a; do
        local ns=$a; [[ $n == b ]] && ns=$b
        ip netns exec $ns tincd -c "$work/tinc-$n" -D --pidfile="$work/tinc-$n.pid" >"$work/tinc-$n.log" 2>&1 & pids+=($!)
        sleep 0.3
    done
    for _ in $(seq 100); do ip netns exec $a ping -c 1 -W 1 -q 10.78.0.2 >/dev/null 2>&1 && return 0; sleep 0.2; done
    WHY="tinc did not connect: $(tail -1 "$work/tinc-a.log")"; return 1
}

peers=${PEERS:-"veth tapir tapir_1t tapir_nogso tapir_nogro tapir_nouo wggo boringtun gotatun openvpn vtun floor tapir_tap openvpn_tap tinc vtun_ether tapir_tcp openvpn_tcp vtun_tcp"}
declare -A label=([veth]="raw veth" [tapir]=tapir [tapir_1t]="tapir, one thread" [tapir_nogso]="tapir, no UDP GSO" [tapir_nogro]="tapir, no UDP GRO" [tapir_nouo]="tapir, no UDP GSO/GRO" [wggo]=wireguard-go [boringtun]=boringtun-cli [gotatun]=gotatun-cli [openvpn]="OpenVPN AES-256-GCM" [vtun]="VTun (no crypto)" [floor]="encrypting floor"
    [tapir_tap]="tapir tap" [openvpn_tap]="OpenVPN tap AES-GCM" [tinc]="tinc switch" [vtun_ether]="VTun ether (no crypto)"
    [tapir_tcp]="tapir TCP" [openvpn_tcp]="OpenVPN TCP AES-GCM" [vtun_tcp]="VTun TCP (no crypto)")
declare -A one four ms loaded idle cpu note
tapir_rss=; tapir_cpu=
for p in $peers; do
    echo "measuring ${label[$p]}..." >&2
    fresh
    WHY="the tunnel did not carry a ping"; DST=; TAPIR_PID=
    if setup_$p && reachable "$DST"; then
        if [[ $p == tapir ]]; then
            ticks0=$(awk '{print $14 + $15}' /proc/$TAPIR_PID/stat 2>/dev/null || echo 0); t0=$(date +%s.%N)
        fi
        rm -f "$work/loaded"
        one[$p]=$(iperf 1 "$DST" "$work/loaded")
        loaded[$p]=$(cat "$work/loaded" 2>/dev/null)
        if [[ $p == tapir ]]; then
            ticks1=$(awk '{print $14 + $15}' /proc/$TAPIR_PID/stat 2>/dev/null || echo 0); t1=$(date +%s.%N)
            tapir_cpu=$(awk -v a="$ticks0" -v b="$ticks1" -v s="$t0" -v e="$t1" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.0f%%", (b - a) / hz / (e - s) * 100 }')
            tapir_rss=$(awk '/VmRSS/ {printf "%.1f MiB", $2 / 1024}' /proc/$TAPIR_PID/status 2>/dev/null)
        fi
        four[$p]=$(iperf 4 "$DST")
        ms[$p]=$(rtt "$DST")
        idle[$p]=$(wakes)
        cpu[$p]=$(cost "$DST")
    else
        note[$p]="not measured: $WHY"
    fi
done
stop_all

best=0; bestname=
for p in wggo boringtun gotatun openvpn vtun; do
    v=${one[$p]:-0}
    if awk -v v="$v" -v b="$best" 'BEGIN { exit !(v > b) }'; then best=$v; bestname=${label[$p]}; fi
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0) printf "%.2f", a / b; else print "-" }'; }
printf '\nSame machine, same run; iperf3 TCP %s s per figure; veth MTU 1500.\n\n' "$T"
printf '| %-22s | %10s | %10s | %10s | %10s | %12s | %12s | %s\n' peer "1 stream" "4 streams" "RTT ms p50" "loaded p50" "idle wakes/s" "CPU %/Gbit/s" status
printf '|%s|%s|%s|%s|%s|%s|%s|%s\n' "------------------------" "------------" "------------" "------------" "------------" "--------------" "--------------" "------"
for p in $peers; do
    printf '| %-22s | %10s | %10s | %10s | %10s | %12s | %12s | %s\n' "${label[$p]}" "${one[$p]:--}" "${four[$p]:--}" "${ms[$p]:--}" "${loaded[$p]:--}" "${idle[$p]:--}" "${cpu[$p]:--}" "${note[$p]:-ok}"
done
printf '\nloaded p50: the median RTT of pings 10 ms apart during the 1-stream transfer.\n'
printf 'CPU %%/Gbit/s: the CPU of both ends'"'"' processes carrying one stream at %s Mbit/s (or less, if that is\nmore than the tunnel moves), in %% of one core per Gbit/s carried.\n' "$RATE_MBIT"
printf '\nGbit/s. tapir / best userspace peer (%s, 1 stream): %s; tapir / raw veth: %s\n' \
    "${bestname:-none}" "$(ratio "${one[tapir]:-0}" "$best")" "$(ratio "${one[tapir]:-0}" "${one[veth]:-0}")"
# lowest ARRAY: the userspace peer with the lowest figure in ARRAY (ms,
# loaded), in $lowp ("none", a key of no array, if none has one).
lowest() {
    local -n of=$1
    local p v lo=
    lowp=none
    for p in wggo boringtun gotatun openvpn vtun; do
        v=${of[$p]:-}
        [[ -n $v ]] || continue
        if [[ -z $lo ]] || awk -v v="$v" -v b="$lo" 'BEGIN { exit !(v < b) }'; then lo=$v; lowp=$p; fi
    done
}
lowest ms
printf 'ping, median: tapir %s ms; the quickest userspace peer (%s) %s ms\n' "${ms[tapir]:--}" "${label[$lowp]:-none}" "${ms[$lowp]:--}"
lowest loaded
printf 'ping during the 1-stream transfer, median: tapir %s ms (moving %s Gbit/s); the lowest userspace peer (%s) %s ms (moving %s)\n' \
    "${loaded[tapir]:--}" "${one[tapir]:--}" "${label[$lowp]:-none}" "${loaded[$lowp]:--}" "${one[$lowp]:--}"
[[ -n ${ms[floor]:-} ]] && printf 'ping, median: the encrypting floor (bench/floor, not a tunnel) %s ms; VTun (no crypto) %s ms\n' "${ms[floor]}" "${ms[vtun]:--}"
printf 'idle, wake-ups per second of both ends: tapir %s; %s\n' "${idle[tapir]:--}" \
    "$(for p in wggo boringtun gotatun openvpn vtun; do [[ -n ${idle[$p]:-} ]] && printf '%s %s, ' "${label[$p]}" "${idle[$p]}"; done | sed 's/, $//')"
lowest cpu
printf 'CPU per Gbit/s at %s Mbit/s: tapir %s%%; the lowest userspace peer (%s) %s%% (%sx tapir'"'"'s)\n' "$RATE_MBIT" \
    "${cpu[tapir]:--}" "${label[$lowp]:-none}" "${cpu[$lowp]:--}" "$(ratio "${cpu[$lowp]:-0}" "${cpu[tapir]:-0}")"
printf 'tapir (sending side) during the 1-stream run: CPU %s of one core, RSS %s\n' "${tapir_cpu:--}" "${tapir_rss:--}"
# The same comparisons for Ethernet tunnels and for tunnels over TCP.
best_of() {
    local b=0 p v
    for p in "$@"; do v=${one[$p]:-0}; awk -v v="$v" -v b="$b" 'BEGIN { exit !(v > b) }' && b=$v; done
    echo "$b"
}
if [[ -n ${one[tapir_tap]:-} ]]; then
    printf 'tap: tapir tap / tapir tun: %s; tapir tap / best tap peer (1 stream): %s\n' \
        "$(ratio "${one[tapir_tap]}" "${one[tapir]:-0}")" "$(ratio "${one[tapir_tap]}" "$(best_of openvpn_tap tinc vtun_ether)")"
fi
if [[ -n ${one[tapir_tcp]:-} ]]; then
    printf 'tcp: tapir TCP / tapir UDP: %s; tapir TCP / best TCP peer (1 stream): %s\n' \
        "$(ratio "${one[tapir_tcp]}" "${one[tapir]:-0}")" "$(ratio "${one[tapir_tcp]}" "$(best_of openvpn_tcp vtun_tcp)")"
fi
# The RTT column above is each tunnel at its own moment, one after another,
# and its medians move by up to 20% run to run (the same tapir binary with
# its UDP offloads on and off: 0.058 and 0.048-0.050 ms in one run). The
# fair comparison brings the tunnels up at once and interleaves their
# pings: bench/ping.sh, here with the peers this run measured (INTERLEAVED=0: not).
if [[ ${INTERLEAVED:-1} != 0 && -n ${ms[tapir]:-} ]]; then
    again=tapir
    for p in vtun floor boringtun; do [[ -n ${ms[$p]:-} ]] && again+=",$p"; done
    [[ -n ${ms[floor]:-} ]] && again+=",floor+tapir"
    echo
    PINGS=$again ROUNDS=${ROUNDS:-10} bench/ping.sh 2>&1 | sed -n '/^ping RTT/,$p'
fi
