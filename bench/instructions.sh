#!/usr/bin/env bash
# User-space instructions a ping costs each end of a tunnel, counted by
# callgrind: deterministic, where every timing on a shared VM moves by
# several per cent from one run to the next. Both ends of each tunnel run
# under valgrind in their own pair of namespaces; after 50 pings to warm up
# the counters are zeroed, COUNT pings (INTERVAL apart) pass, and the
# counts are dumped.
#
#   ns a: va 10.201.0.1 ── veth ── vb 10.201.0.2 :ns b
#         tunnel 10.78.0.1 ═══════ tunnel 10.78.0.2      (a pings b)
#
# Tunnels (TUNNELS, default all): tapir, floor (bench/floor: poll, read,
# seal, send / receive, open, write, and nothing else), vtun (VTun without
# encryption). Prints instructions a ping at each end (a: sends the request
# and opens the reply; b: opens the request and sends the reply), and with
# TOP=N the N functions that cost most at end a. Kernel time is not
# counted: it is the same system calls for all, and bench/ping.sh times
# the whole. Installs valgrind if missing.
#
# LINES=1 counts instead what a ping touches (valgrind's lackey, every
# access traced; COUNT defaults to 100; tapir and the floor: VTun's
# handshake times out that slowed down): the 64-byte lines of code and of
# data (stack included) touched in at least 80% of the pings, and the 4 KiB
# pages they lie in; with TOP=N, the N functions whose lines they are at
# end a (a data line goes to the function that touched it most). With pings far apart (bench/ping.sh sends them 2 ms
# apart) each wake-up finds most of them cold, and each costs a miss: on
# the 2-core development machine a ping's time through a tunnel grew with
# the lines it touched more than with its instructions.
set -uo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || { echo "bench/instructions.sh: needs root (network namespaces): sudo $0" >&2; exit 1; }
LINES=${LINES:-}; COUNT=${COUNT:-$([[ -n $LINES ]] && echo 100 || echo 500)}
INTERVAL=${INTERVAL:-0.01}; TOP=${TOP:-0}
export PATH="$HOME/.cargo/bin:$PATH"
need=()
for pair in valgrind:valgrind vtund:vtun ping:iputils-ping python3:python3-minimal; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if ((${#need[@]})); then
    echo "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release --locked -q -p tapir || exit 1
(cd bench/floor && cargo build --release --locked -q) || exit 1
tapir=$PWD/target/release/tapir
floor=$PWD/bench/floor/target/release/tapir-floor
tag=bi$$
work=$(mktemp -d)
pids=(); spaces=()
cleanup() {
    local p n
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
    for n in "${spaces[@]}"; do ip netns del "$n" 2>/dev/null; done
    [[ -n ${KEEP:-} ]] && echo "kept $work" || rm -rf "$work"
}
trap cleanup EXIT INT TERM

# One tunnel at a time: callgrind slows each end some fifty times.
measure() {
    local t=$1 a=$tag-$1-a b=$tag-$1-b n s out=$work/$1
    local vg=(valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$out.%q{TAPIR_END}.%p")
    [[ -n $LINES ]] && vg=(valgrind --tool=lackey --trace-mem=yes --trace-children=yes --log-file="$out.%q{TAPIR_END}.%p")
    ip netns add "$a" && ip netns add "$b" || return 1
    spaces+=("$a" "$b")
    for n in "$a" "$b"; do
        ip -n "$n" link set lo up
        ip netns exec "$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    done
    ip -n "$a" link add va type veth peer name vb netns "$b"
    ip -n "$a" addr add 10.201.0.1/24 dev va && ip -n "$b" addr add 10.201.0.2/24 dev vb
    ip -n "$a" link set va up && ip -n "$b" link set vb up
    case $t in
        tapir)
            local ka kb
            ka=$("$tapir" genkey); kb=$("$tapir" genkey)
            printf '[Interface]\nPrivateKey = %s\nAddress = 10.78.0.1/24\n[Peer]\nPublicKey = %s\nEndpoint = 10.201.0.2:51820\nAllowedIPs = 10.78.0.2/32\n' \
                "$ka" "$(echo "$kb" | "$tapir" pubkey)" > "$work/a.conf"
            printf '[Interface]\nPrivateKey = %s\nListenPort = 51820\nAddress = 10.78.0.2/24\n[Peer]\nPublicKey = %s\nAllowedIPs = 10.78.0.1/32\n' \
                "$kb" "$(echo "$ka" | "$tapir" pubkey)" > "$work/b.conf"
            chmod 600 "$work"/?.conf
            for s in b a; do
                ip netns exec "$tag-$t-$s" env TAPIR_END=$s "${vg[@]}" "$tapir" run "$work/$s.conf" 2>"$work/$t-$s.log" & pids+=($!)
                sleep 1
            done ;;
        floor)
            ip netns exec "$b" env TAPIR_END=b "${vg[@]}" "$floor" floor0 5555 10.201.0.1:5555 2>"$work/$t-b.log" & pids+=($!)
            ip netns exec "$a" env TAPIR_END=a "${vg[@]}" "$floor" floor0 5555 10.201.0.2:5555 2>"$work/$t-a.log" & pids+=($!)
            for _ in $(seq 100); do ip -n "$a" link show floor0 >/dev/null 2>&1 && ip -n "$b" link show floor0 >/dev/null 2>&1 && break; sleep 0.1; done
            for s in a b; do
                ip -n "$tag-$t-$s" addr add 10.78.0."$([[ $s == a ]] && echo 1 || echo 2)"/24 dev floor0
                ip -n "$tag-$t-$s" link set floor0 mtu 1420 up
            done ;;
        vtun)
            local ip side me; ip=$(command -v ip)
            for side in b a; do
                if [[ $side == b ]]; then me=10.78.0.2; else me=10.78.0.1; fi
                cat > "$work/v-$side.conf" <<CONF
options { port 5000; ip $ip; timeout 10; }
default { compress no; speed 0; }
demo {
  passwd benchsecret; type tun; proto udp; encrypt no; keepalive yes; stat no;
  up {
    ip "addr add $me/24 dev %%" ;
    ip "link set %% mtu 1450 up" ;
  };
}
CONF
            done
            ip netns exec "$b" env TAPIR_END=b "${vg[@]}" vtund -s -n -f "$work/v-b.conf" >"$work/$t-b.log" 2>&1 & pids+=($!)
            sleep 3
            ip netns exec "$a" env TAPIR_END=a "${vg[@]}" vtund -n -f "$work/v-a.conf" demo 10.201.0.2 >"$work/$t-a.log" 2>&1 & pids+=($!) ;;
    esac
    local up=
    for _ in $(seq 150); do ip netns exec "$a" ping -c 1 -W 1 -q 10.78.0.2 >/dev/null 2>&1 && { up=1; break; }; sleep 0.3; done
    [[ -n $up ]] || { echo "$t: did not carry a ping"; return 1; }
    ip netns exec "$a" ping -c 50 -i "$INTERVAL" -q 10.78.0.2 >/dev/null
    local got
    if [[ -n $LINES ]]; then
        # Where each end's trace stands before and after the counted pings.
        sleep 0.5; wc -c "$out".[ab].* > "$work/$t.from"
        got=$(ip netns exec "$a" ping -c "$COUNT" -i "$INTERVAL" -q 10.78.0.2 | sed -n 's/.* \([0-9]*\) received.*/\1/p')
        sleep 0.5; wc -c "$out".[ab].* > "$work/$t.to"
        footprint "$t" "$2" "$got"
        return
    fi
    callgrind_control -z >/dev/null 2>&1; sleep 0.5
    got=$(ip netns exec "$a" ping -c "$COUNT" -i "$INTERVAL" -q 10.78.0.2 | sed -n 's/.* \([0-9]*\) received.*/\1/p')
    sleep 0.3
    callgrind_control -d >/dev/null 2>&1; sleep 1
    # Each end's dump of the counted stretch (a forking daemon: the process that moved packets).
    for s in a b; do
        local best=0 f n
        for f in "$out.$s".*.1; do
            [[ -e $f ]] || continue
            n=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
            if [[ -n $n ]] && ((n > best)); then best=$n; eval "file_$s=\$f"; fi
        done
        eval "ins_$s=$best"
    done
    # shellcheck disable=SC2154 # set by eval above
    local per_b=$((ins_b / got))
    # VTun's server forks a process per session, which callgrind_control
    # does not reach: its end b is not counted (end a does the same work).
    ((per_b > 0)) || per_b=-
    printf '| %-18s | %8d | %8s | %6d\n' "$2" $((ins_a / got)) "$per_b" "$got"
    # shellcheck disable=SC2154
    ((TOP > 0)) && callgrind_annotate --inclusive=yes "$file_a" 2>/dev/null | awk -v n="$got" -v top="$TOP" '
        /PROGRAM TOTALS/ { on = 1; next } on && /^ *[0-9,]+ / { c = $1; gsub(",", "", c); $1 = ""; $2 = ""; sub(/^ +/, ""); sub(/ \[.*/, ""); sub(/^.*:/, ""); if (!seen[$0]++ && k++ < top) printf "    %8.0f  %s\n", c / n, $0 }' >&2
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
    pids=()
}

# LINES=1: the lines and pages touched in most pings, at each end (the
# process whose trace grew most over the counted stretch).
footprint() {
    local t=$1 label=$2 got=$3 s f
    local row=("$label")
    for s in a b; do
        f=$(awk -v s="$s" 'NR == FNR { from[$2] = $1; next } $2 ~ ("\\." s "\\.[0-9]+$") { d = $1 - from[$2]; if (d > best) { best = d; f = $2 } } END { print f }' "$work/$t.from" "$work/$t.to")
        [[ -n $f ]] || { row+=(- - - -); continue; }
        local bin=$tapir top=0
        [[ $t == floor ]] && bin=$floor
        [[ $s == a ]] && top=$TOP
        row+=($(python3 - "$f" "$(awk -v f="$f" '$2 == f { print $1 }' "$work/$t.from")" "$(awk -v f="$f" '$2 == f { print $1 }' "$work/$t.to")" "$got" "$bin" "$top" <<'PY'
import sys, collections, subprocess, bisect, re
path, start, end, pings = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
binary, top = sys.argv[5], int(sys.argv[6])
with open(path, 'rb') as fh:
    fh.seek(start)
    records = fh.read(end - start).decode(errors='replace').splitlines()[1:-1]
code, data = collections.Counter(), collections.Counter()
# Which instruction touched each data line (the last 'I' before it), and
# the first instruction seen in each code line.
who, first = collections.defaultdict(collections.Counter), {}
ip = 0
for r in records:
    kind, _, rest = r.strip().partition(' ')
    if kind not in ('I', 'L', 'S', 'M'):
        continue
    try:
        addr, size = rest.strip().split(',')
        addr, size = int(addr, 16), int(size)
    except ValueError:
        continue
    if kind == 'I':
        ip = addr
        first.setdefault(addr >> 6, addr)
    elif top:
        who[addr >> 6][ip] += 1
    for line in {addr >> 6, (addr + size - 1) >> 6}:
        (code if kind == 'I' else data)[line] += 1
hot = lambda c: {l for l, n in c.items() if n >= 0.8 * pings}
hc, hd = hot(code), hot(data)
print(len(hc), len(hd), len({l >> 6 for l in hc}), len({l >> 6 for l in hd}))
if top:
    # TOP=N: the functions those lines belong to, by their symbols
    # (valgrind loads a position-independent program at 0x108000).
    syms = []
    nm = subprocess.run(['nm', '-C', '--defined-only', '-n', binary], capture_output=True, text=True).stdout
    for l in nm.splitlines():
        p = l.split(' ', 2)
        if len(p) == 3 and p[1] in 'tTwW':
            syms.append((int(p[0], 16) + 0x108000, re.sub(r'::h[0-9a-f]{16}$', '', p[2])))
    starts = [a for a, _ in syms]
    def name(a):
        i = bisect.bisect_right(starts, a) - 1
        if i < 0 or a - starts[i] > 1 << 20:
            return '(outside the program: libc, the vDSO)'
        return syms[i][1]
    c = collections.Counter(name(first.get(l, l << 6)) for l in hc)
    d = collections.Counter(name(who[l].most_common(1)[0][0]) if who[l] else '?' for l in hd)
    print('    code  data  (lines touched at end a, by function)', file=sys.stderr)
    for f in sorted(set(c) | set(d), key=lambda f: -(c[f] + d[f]))[:top]:
        print('    %4d  %4d  %s' % (c[f], d[f], f[:100]), file=sys.stderr)
PY
))
    done
    printf '| %-18s | %6s | %5s | %5s | %5s | %6s | %5s | %5s | %5s | %6d\n' "${row[@]}" "$got"
}

# (VTun's handshake times out when every access of its is traced.)
tunnels=${TUNNELS:-$([[ -n $LINES ]] && echo "tapir floor" || echo "tapir floor vtun")}
declare -A label=([tapir]=tapir [floor]="encrypting floor" [vtun]="VTun (no crypto)")
if [[ -n $LINES ]]; then
    printf '\n64-byte lines and 4 KiB pages a ping touches (lackey: in 80%% of %s pings %s s apart)\n\n' "$COUNT" "$INTERVAL"
    printf '| %-18s | %6s | %5s | %5s | %5s | %6s | %5s | %5s | %5s | %6s\n' tunnel "a:code" "data" "cpage" "dpage" "b:code" "data" "cpage" "dpage" pings
    printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s\n' "--------------------" "--------" "-------" "-------" "-------" "--------" "-------" "-------" "-------" "------"
else
    printf '\nuser-space instructions a ping (callgrind), %s pings %s s apart\n\n' "$COUNT" "$INTERVAL"
    printf '| %-18s | %8s | %8s | %6s\n' tunnel "end a" "end b" pings
    printf '|%s|%s|%s|%s\n' "--------------------" "----------" "----------" "------"
fi
for t in $tunnels; do
    [[ -n ${label[$t]:-} ]] || { echo "unknown tunnel $t" >&2; continue; }
    measure "$t" "${label[$t]}"
done
