#!/usr/bin/env bash
# Relay throughput of sluice's embedded TURN server against coturn's turnserver: the same machine
# and the same client, coturn's turnutils_uclient relaying UDP (ChannelData) to a turnutils_peer
# that echoes, through sluice and then through coturn, in one run. Appends one row per load to
# perf/RESULTS-turn.md, and the exact commands of the run below the table. Loopback only, in a
# private network namespace; bounded in time (about 22 s per measurement, 12 by default: ~5 min).
#
#   perf/turn_vs_coturn.sh                        # builds target/release/sluice first
#   SLUICE_BIN=target/release/sluice perf/turn_vs_coturn.sh
#   LOADS="paced:40:1 flood:10:0" ROUNDS=3 perf/turn_vs_coturn.sh
#
# Loads (LOADS, space-separated NAME:CLIENTS:INTERVAL_MS; default "paced:20:1 flood:10:0"):
# turnutils_uclient -c (no RTCP allocations) -m CLIENTS -z INTERVAL_MS -l MSG_LEN (default 100):
#   - paced:20:1  20 clients, one message per client per ms: 20,000 messages/s, i.e. 40,000
#     relayed datagrams/s offered (each message is relayed to the peer, and its echo back), a
#     load both servers carry: compares CPU per datagram at the same throughput;
#   - flood:10:0  -z 0: each client sends up to 50 messages per 1-ms tick, as fast as uclient goes:
#     compares the most each server relays while the same client pushes as hard as it can.
# uclient starts each client 1-6 s after connecting them all, so the window (WINDOW_S, default 10)
# opens WARMUP_S (default 7) after the first relayed datagram; uclient is stopped after it.
#
# Counting, in the namespace (only this test's datagrams exist there): every datagram the server
# reads it relays (ChannelData <-> plain UDP, one for one), so with IN = the kernel's Udp
# InDatagrams delta (every datagram some socket read) and DC = the drops (full receive buffers) of
# the client-side sockets (uclient's and the peer's, from /proc/net/udp), the server relayed
# R = (IN + DC) / 2 datagrams, of which R - DC reached uclient or the peer. pps = R / window. For
# sluice, its own sluice_turn_relayed_packets_total over the window is printed as a cross-check.
# CPU: utime + stime of the server process (all threads, /proc/PID/stat) over the window; CPU us
# per relayed datagram; the client side's CPU (uclient + peer), to see which side set the pace;
# and how busy the server's CPU was with anything else (/proc/stat), since other work on a shared
# machine steals from the pinned server.
#
# Pinning (taskset): the server on SERVER_CPU (default 0); uclient and turnutils_peer on
# CLIENT_CPUS (default 1; 1-2 with 3+ CPUs). sluice runs with one media shard, not self-pinned;
# its TURN runs on the control thread. coturn: --relay-threads=$COTURN_RELAY_THREADS (default 1:
# one relay thread, like sluice's one control thread; its listener/auth threads also exist, on the
# same CPU). Relay ports 61000-65000 for both, outside the kernel's ephemeral range, so the
# server's sockets and the client's are told apart by port.
#
# A shared machine's other work steals from the pinned server: a window in which more than
# OTHER_MAX % (default 15) of the server's CPU went elsewhere is discarded and measured again, at
# most RETRIES (default 4) times per run; the row says when some noise remained.
#
# Environment: SLUICE_BIN (skip the build), LOADS, ROUNDS (default 3: sluice and coturn
# alternate, every figure is the median of the rounds), OTHER_MAX, RETRIES, MSG_LEN, WINDOW_S, WARMUP_S, SERVER_CPU,
# CLIENT_CPUS, COTURN_RELAY_THREADS, RESULTS (default perf/RESULTS-turn.md), KEEP=1 (keep the
# work dir and print it).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LOADS=${LOADS:-"paced:20:1 flood:10:0"}
ROUNDS=${ROUNDS:-3}
MSG_LEN=${MSG_LEN:-100}
WINDOW_S=${WINDOW_S:-10}
WARMUP_S=${WARMUP_S:-7}
NCPU=$(nproc)
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPUS=${CLIENT_CPUS:-$([ "$NCPU" -ge 3 ] && echo 1-2 || echo 1)}
COTURN_RELAY_THREADS=${COTURN_RELAY_THREADS:-1}
RESULTS=${RESULTS:-perf/RESULTS-turn.md}
OTHER_MAX=${OTHER_MAX:-15}
RETRIES=${RETRIES:-4}
MESSAGES=100000000 # per client: more than any window needs; uclient is stopped after the window
RELAY_LO=61000
RELAY_HI=65000

die() { echo "turn_vs_coturn: $*" >&2; exit 1; }

# ------------------------------------------------------------------ inside the namespace
if [ "${1:-}" = --inside ]; then
    WORK=$2
    SECRET=$(cat "$WORK/secret")
    TURN_PORT=3478
    PEER_PORT=3480
    HTTP_PORT=18080
    TCK=$(getconf CLK_TCK)
    ip link set lo up || die "ip link set lo up failed"
    PIDS=()
    cleanup() {
        for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
        wait 2>/dev/null
    }
    trap cleanup EXIT

    udp() { awk -v k="$1" '/^Udp:/ { if (!h) { for (i = 2; i <= NF; i++) n[i] = $i; h = 1 } else for (i = 2; i <= NF; i++) if (n[i] == k) print $i }' /proc/net/snmp; }
    # receive-buffer drops of the client-side sockets (not the TURN port, not a relay port)
    client_drops() {
        awk -v t="$TURN_PORT" -v lo="$RELAY_LO" -v hi="$RELAY_HI" 'NR > 1 {
            split($2, a, ":"); h = toupper(a[2]); p = 0
            for (i = 1; i <= length(h); i++) p = p * 16 + index("0123456789ABCDEF", substr(h, i, 1)) - 1
            if (p != t && (p < lo || p > hi)) d += $NF } END { print d + 0 }' /proc/net/udp
    }
    cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
    # idle + iowait ticks of CPU $1: measured exactly on a tickless kernel, unlike the busy
    # states, which are sampled at ticks and miss short bursts (a paced server's life)
    cpu_idle() { awk -v c="cpu$1" '$1 == c { print $5 + $6 }' /proc/stat; }
    now() { date +%s.%N; }
    sluice_relayed() { # to_peer+to_client
        curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics" 2>/dev/null |
            awk '/^sluice_turn_relayed_packets_total/ { s += $2; if (/to_peer/) p = $2 } END { printf "%d+%d\n", p, s - p }'
    }
    wait_stun() { # PID: waits for a STUN answer on the TURN port
        for _ in $(seq 1 50); do
            timeout 2 turnutils_stunclient -p "$TURN_PORT" 127.0.0.1 >/dev/null 2>&1 && return 0
            kill -0 "$1" 2>/dev/null || return 1
            sleep 0.2
        done
        return 1
    }

    taskset -c "$CLIENT_CPUS" turnutils_peer -L 127.0.0.1 -p "$PEER_PORT" >"$WORK/peer.log" 2>&1 &
    PEER_PID=$!
    PIDS+=("$PEER_PID")
    echo "taskset -c $CLIENT_CPUS turnutils_peer -L 127.0.0.1 -p $PEER_PORT" >>"$WORK/commands"

    SLUICE_ENV=(SLUICE_HTTP_LISTEN=127.0.0.1:$HTTP_PORT SLUICE_MEDIA_PORT_BASE=40000 SLUICE_MEDIA_SHARDS=1
        SLUICE_MEDIA_LISTEN_IPS=127.0.0.1 SLUICE_MEDIA_PIN_CORES=false SLUICE_TURN_LISTEN=127.0.0.1:$TURN_PORT
        SLUICE_TURN_SECRET=$SECRET SLUICE_TURN_RELAY_PORTS=$RELAY_LO-$RELAY_HI SLUICE_TURN_ALLOW_LOOPBACK_PEERS=true
        SLUICE_TURN_BANDWIDTH_BPS=0 SLUICE_TURN_USER_QUOTA=100000 SLUICE_TURN_TOTAL_QUOTA=100000 SLUICE_LOG_LEVEL=warn)
    COTURN_ARGS=(-n --no-cli --use-auth-secret --static-auth-secret="$SECRET" --realm=sluice
        -L 127.0.0.1 -E 127.0.0.1 -p "$TURN_PORT" --min-port="$RELAY_LO" --max-port="$RELAY_HI"
        --allow-loopback-peers --no-tls --no-dtls --relay-threads="$COTURN_RELAY_THREADS"
        --log-file="$WORK/coturn.log" --simple-log --no-stdout-log --pidfile="$WORK/coturn.pid")
    echo "env ${SLUICE_ENV[*]} taskset -c $SERVER_CPU $SLUICE_BIN serve" >>"$WORK/commands"
    echo "taskset -c $SERVER_CPU turnserver ${COTURN_ARGS[*]}" >>"$WORK/commands"

    # measure SERVER LOAD CLIENTS INTERVAL: one server, one load; prints a RESULT line
    measure() {
        local server=$1 load=$2 clients=$3 z=$4 spid upid
        if [ "$server" = sluice ]; then
            env "${SLUICE_ENV[@]}" taskset -c "$SERVER_CPU" "$WORK/sluice" serve >>"$WORK/sluice.log" 2>&1 &
        else
            taskset -c "$SERVER_CPU" turnserver "${COTURN_ARGS[@]}" >>"$WORK/coturn.out" 2>&1 &
        fi
        spid=$!
        PIDS+=("$spid")
        if ! wait_stun "$spid"; then
            LAST="server=$server load=$load failed=no-STUN-answer-on-127.0.0.1:$TURN_PORT"
            kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null
            return 1
        fi
        echo "$(date +%T) $server, $load: uclient -m $clients -z $z -l $MSG_LEN" >&2
        taskset -c "$CLIENT_CPUS" turnutils_uclient -c -z "$z" -m "$clients" -l "$MSG_LEN" -n "$MESSAGES" \
            -W "$SECRET" -u perf -e 127.0.0.1 -r "$PEER_PORT" -p "$TURN_PORT" 127.0.0.1 \
            >"$WORK/$server-$load.uclient.out" 2>&1 &
        upid=$!
        PIDS+=("$upid")
        grep -q -- "-z $z -m $clients " "$WORK/commands" ||
            echo "taskset -c $CLIENT_CPUS turnutils_uclient -c -z $z -m $clients -l $MSG_LEN -n $MESSAGES -W $SECRET -u perf -e 127.0.0.1 -r $PEER_PORT -p $TURN_PORT 127.0.0.1" >>"$WORK/commands"
        local base first=
        base=$(udp InDatagrams)
        for _ in $(seq 1 300); do
            kill -0 "$upid" 2>/dev/null || break
            if [ $(($(udp InDatagrams) - base)) -gt 1000 ]; then first=1; break; fi
            sleep 0.1
        done
        local result
        if [ -z "$first" ]; then
            result="failed=no-relayed-traffic-in-30-s"
        else
            sleep "$WARMUP_S"
            local t0 in0 o0 e0 dc0 c0 k0 b0 s0 t1 in1 o1 e1 dc1 c1 k1 b1 s1
            s0=$([ "$server" = sluice ] && sluice_relayed || echo 0+0)
            t0=$(now); in0=$(udp InDatagrams); o0=$(udp OutDatagrams); e0=$(udp RcvbufErrors); dc0=$(client_drops); c0=$(cpu_ticks "$spid")
            k0=$(($(cpu_ticks "$upid") + $(cpu_ticks "$PEER_PID"))); b0=$(cpu_idle "$SERVER_CPU")
            sleep "$WINDOW_S"
            t1=$(now); in1=$(udp InDatagrams); o1=$(udp OutDatagrams); e1=$(udp RcvbufErrors); dc1=$(client_drops); c1=$(cpu_ticks "$spid")
            k1=$(($(cpu_ticks "$upid") + $(cpu_ticks "$PEER_PID"))); b1=$(cpu_idle "$SERVER_CPU")
            s1=$([ "$server" = sluice ] && sluice_relayed || echo 0+0)
            if ! kill -0 "$upid" 2>/dev/null; then
                result="failed=uclient-ended-early:$(grep -v '^\s*$' "$WORK/$server-$load.uclient.out" | tail -1 | tr ' ' _)"
            else
                result=$(awk -v t0="$t0" -v t1="$t1" -v in0="$in0" -v in1="$in1" -v dc0="$dc0" -v dc1="$dc1" \
                    -v c0="$c0" -v c1="$c1" -v k0="$k0" -v k1="$k1" -v b0="$b0" -v b1="$b1" \
                    -v s0="$s0" -v s1="$s1" -v tck="$TCK" -v o0="$o0" -v o1="$o1" -v e0="$e0" -v e1="$e1" 'BEGIN {
                    split(s0, sa, "+"); split(s1, sb, "+"); sp = sb[1] - sa[1]; sc = sb[2] - sa[2]
                    secs = t1 - t0; dc = dc1 - dc0; r = (in1 - in0 + dc) / 2; cpu = (c1 - c0) / tck
                    printf "secs=%.2f relayed=%d pps=%.0f delivered_pps=%.0f cpu_s=%.2f us_per_dgram=%.2f", secs, r, r / secs, (r - dc) / secs, cpu, cpu * 1e6 / r
                    printf " cpu_pct=%.0f client_cpu_pct=%.0f other_pct=%.0f client_drops=%d own_count_pps=%.0f",
                        100 * cpu / secs, 100 * (k1 - k0) / tck / secs, 100 * (secs - (b1 - b0) / tck - cpu) / secs,
                        dc, (sp + sc) / secs
                    # datagrams dropped on the full sockets of the server, as % of what was sent to it
                    ds = (e1 - e0) - dc
                    printf " server_drops=%d server_drop_pct=%.1f", ds, 100 * ds / (r + ds)
                    printf " in=%d out=%d rcvbuf_errors=%d own_to_peer=%d own_to_client=%d", in1 - in0, o1 - o0, e1 - e0, sp, sc }')
            fi
        fi
        kill "$upid" "$spid" 2>/dev/null
        wait "$upid" "$spid" 2>/dev/null
        LAST="server=$server load=$load clients=$clients z=$z $result"
    }

    # A window in which more than OTHER_MAX % of the server's CPU went to something else (another
    # process on a shared machine) is measured again, RETRIES times at most in the whole run.
    retries=$RETRIES
    for load in $LOADS; do
        IFS=: read -r lname lclients lz <<<"$load"
        for round in $(seq 1 "$ROUNDS"); do
            for server in sluice coturn; do
                while :; do
                    LAST=
                    measure "$server" "$lname" "$lclients" "$lz"
                    other=$(sed -n 's/.* other_pct=\(-\?[0-9]*\).*/\1/p' <<<"$LAST")
                    if [ -n "$other" ] && [ "$other" -gt "$OTHER_MAX" ] && [ "$retries" -gt 0 ]; then
                        retries=$((retries - 1))
                        echo "DISCARDED (other work took $other % of the server CPU; $retries retries left) $LAST"
                        sleep 2
                        continue
                    fi
                    echo "RESULT $LAST"
                    break
                done
                sleep 1
            done
        done
    done
    exit 0
fi

# ------------------------------------------------------------------ outside: set up, run, record
for tool in turnserver turnutils_uclient turnutils_peer turnutils_stunclient taskset unshare ip curl; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install -y coturn util-linux iproute2 curl)"
done
[ "$NCPU" -ge 2 ] || die "needs 2 CPUs to pin the server and the client apart (have $NCPU)"
for l in $LOADS; do [[ $l =~ ^[a-z0-9_-]+:[1-9][0-9]*:[0-9]+$ ]] || die "LOADS entries are NAME:CLIENTS:INTERVAL_MS, got '$l'"; done
unshare -n true 2>/dev/null || die "cannot make a network namespace (unshare -n): run as root"

if [ -z "${SLUICE_BIN:-}" ]; then
    echo "building: cargo build --release --bin sluice" >&2
    cargo build --release --bin sluice >&2 || die "cargo build --release --bin sluice failed"
    SLUICE_BIN=target/release/sluice
fi
[ -x "$SLUICE_BIN" ] || die "no sluice binary at $SLUICE_BIN"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/turn-vs-coturn.XXXXXX")
[ -n "${KEEP:-}" ] && echo "work dir: $WORK" >&2
cp "$SLUICE_BIN" "$WORK/sluice" # a copy: a concurrent build cannot swap the binary mid-run
echo "perf-$RANDOM$RANDOM$RANDOM" >"$WORK/secret"
echo "unshare -n perf/turn_vs_coturn.sh --inside \$WORK   # a private network namespace; inside it: ip link set lo up, then" >"$WORK/commands"

export LOADS ROUNDS MSG_LEN WINDOW_S WARMUP_S SERVER_CPU CLIENT_CPUS COTURN_RELAY_THREADS SLUICE_BIN OTHER_MAX RETRIES
N_MEAS=$(($(wc -w <<<"$LOADS") * ROUNDS * 2 + RETRIES))
timeout -k 5 $((N_MEAS * (WARMUP_S + WINDOW_S + 45) + 30)) unshare -n "$0" --inside "$WORK" | tee "$WORK/out"

# median of the values of KEY over the RESULT lines of SERVER and LOAD
median() {
    awk -v s="server=$1" -v l="load=$2" -v k="$3" '$1 == "RESULT" && $2 == s && $3 == l {
        for (i = 4; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) print kv[2] } }' "$WORK/out" |
        sort -g | awk '{ v[++n] = $1 } END { if (n) print (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2 }'
}
calc() { awk "BEGIN { printf \"$1\", $2 }"; }

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || COMMIT="$COMMIT + uncommitted src"
MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MACHINE="$NCPU cores, $MODEL, Linux $(uname -r)"
DATE=$(date -u +%Y-%m-%dT%H:%MZ)

if [ ! -f "$RESULTS" ]; then
    cat >"$RESULTS" <<'EOF'
# TURN relay throughput: sluice against coturn

Written by `perf/turn_vs_coturn.sh` (its header has the whole method). The same machine and the same
client: coturn's `turnutils_uclient` (UDP to the server, ChannelData, no RTCP allocations) relaying
to a `turnutils_peer` that echoes, through sluice's embedded TURN server and then through coturn's
`turnserver` (TURN REST secret, loopback peers allowed, no TLS, no CLI), in a private network
namespace, the server and the client pinned to different CPUs with `taskset`. One row per load
per run; the commands of each run are below the table.

- **pps**: datagrams the server relayed per second (both directions: to the peer, and the echo
  back), counted by the kernel in the namespace; for sluice, its own
  `sluice_turn_relayed_packets_total` rate in brackets.
- **delivered pps**: of those, how many per second reached uclient or the peer (the rest the
  kernel dropped on their full sockets: the client side could not keep up); **dropped at
  server**: the datagrams sent to the server that the kernel dropped on the server's full sockets,
  as % of all sent to it (the server could not keep up).
- **CPU**: the server process's utime + stime over the window, as % of one CPU, and server CPU
  microseconds per relayed datagram.
- **client %**: uclient + peer CPU, % of one CPU; near 100 % means the client side set the pace.
  **other %**: how busy the server's CPU was beyond what is charged to the server process (other
  processes: a shared machine steals from the pinned server; and kernel work such as softirqs
  not run in the server's context); a few % either way is accounting noise.
- **ratios** sluice / coturn: throughput above 1, and CPU per datagram below 1, favour sluice.

| date (UTC) | commit | machine | load | pinning | sluice pps [own count] | sluice: delivered pps, dropped at server | sluice CPU %, us/dgram | sluice: client %, other % | coturn pps | coturn: delivered pps, dropped at server | coturn CPU %, us/dgram | coturn: client %, other % | pps ratio s/c | CPU/dgram ratio s/c |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
<!-- rows end: perf/turn_vs_coturn.sh inserts new rows above this line -->

## Commands of each run
EOF
fi

recorded=0
SUMMARY=()
for load in $LOADS; do
    IFS=: read -r lname lclients lz <<<"$load"
    declare -A V=()
    ok=1
    for s in sluice coturn; do
        for k in pps delivered_pps us_per_dgram cpu_pct client_cpu_pct other_pct own_count_pps server_drop_pct; do
            V[$s.$k]=$(median "$s" "$lname" "$k")
        done
        [ -n "${V[$s.pps]}" ] || ok=0
    done
    if [ "$ok" = 0 ]; then
        echo "turn_vs_coturn: load $lname: a measurement failed (see the RESULT lines); no row for it" >&2
        continue
    fi
    # the most the server's CPU did for others in any measurement of this load
    MAXOTHER=$(awk -v l="load=$lname" '$1 == "RESULT" && $3 == l { for (i = 4; i <= NF; i++) { split($i, kv, "=")
        if (kv[1] == "other_pct" && kv[2] > m) m = kv[2] } } END { print m + 0 }' "$WORK/out")
    NOISE=
    if [ "$MAXOTHER" -gt "$OTHER_MAX" ]; then
        NOISE="; noisy: up to $MAXOTHER % of the server CPU went elsewhere"
        echo "turn_vs_coturn: WARNING: load $lname: up to $MAXOTHER % of the server's CPU was busy with other work in a window (other processes on this machine?)" >&2
    fi
    R_PPS=$(calc %.2f "${V[sluice.pps]} / ${V[coturn.pps]}")
    R_CPP=$(calc %.2f "${V[sluice.us_per_dgram]} / ${V[coturn.us_per_dgram]}")
    LOADTXT="$lname: -m $lclients -z $lz -l $MSG_LEN; ${WINDOW_S} s window$([ "$ROUNDS" -gt 1 ] && echo ", median of $ROUNDS")$NOISE"
    PIN="server CPU $SERVER_CPU, uclient+peer CPU $CLIENT_CPUS; coturn --relay-threads=$COTURN_RELAY_THREADS"
    ROW="| $DATE | $COMMIT | $MACHINE | $LOADTXT | $PIN | ${V[sluice.pps]} [${V[sluice.own_count_pps]}] | ${V[sluice.delivered_pps]}, ${V[sluice.server_drop_pct]} % | ${V[sluice.cpu_pct]} %, ${V[sluice.us_per_dgram]} | ${V[sluice.client_cpu_pct]} %, ${V[sluice.other_pct]} % | ${V[coturn.pps]} | ${V[coturn.delivered_pps]}, ${V[coturn.server_drop_pct]} % | ${V[coturn.cpu_pct]} %, ${V[coturn.us_per_dgram]} | ${V[coturn.client_cpu_pct]} %, ${V[coturn.other_pct]} % | $R_PPS | $R_CPP |"
    awk -v row="$ROW" '/^<!-- rows end/ { print row } { print }' "$RESULTS" >"$RESULTS.tmp" && mv "$RESULTS.tmp" "$RESULTS"
    recorded=$((recorded + 1))
    SUMMARY+=("$lname: sluice ${V[sluice.pps]} dgram/s at ${V[sluice.cpu_pct]} % CPU (${V[sluice.us_per_dgram]} us/dgram); coturn ${V[coturn.pps]} dgram/s at ${V[coturn.cpu_pct]} % (${V[coturn.us_per_dgram]} us/dgram); sluice/coturn: throughput $R_PPS, CPU per datagram $R_CPP")
    unset V
done
if [ "$recorded" -gt 0 ]; then
    {
        echo
        echo "### $DATE ($COMMIT)"
        echo
        echo '```sh'
        sed -e "s|$WORK|\$WORK|g" -e "s|$(cat "$WORK/secret")|\$SECRET|g" "$WORK/commands"
        echo '```'
    } >>"$RESULTS"
fi
echo
for l in "${SUMMARY[@]}"; do echo "$l"; done
echo "$recorded row(s) appended to $RESULTS"
[ -z "${KEEP:-}" ] && rm -rf "$WORK"
[ "$recorded" -eq "$(wc -w <<<"$LOADS")" ]
