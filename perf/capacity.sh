#!/usr/bin/env bash
# Capacity benchmark for sluice: builds release, pins sluice and sluice-loadgen to separate CPUs,
# runs the standard set, and appends one row per run to perf/RESULTS.md (charts in perf/charts/).
#
#   perf/capacity.sh                 # the standard set, sized for a 2-CPU machine
#   SFU_CPUS=2-5 LG_CPUS=6-15 FANOUT_SUBS=2000 perf/capacity.sh   # a bigger box
#   CASES="fanout-uring fanout-simulcast-uring" perf/capacity.sh   # some cases only (names below)
#   MEETING=1 perf/capacity.sh       # also the optional /ws room case (or CASES="meeting-uring")
#   BUILD=0 SLUICE=/tmp/old/sluice CASES=fanout-uring perf/capacity.sh   # another build of sluice
#   SFU_LOG_LEVEL=info CASES=fanout-simulcast-uring perf/capacity.sh   # sluice logs its layer switches
#
# Everything runs on loopback (127.0.0.1) and every step is bounded in time. See perf/README.md.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

NCPU=$(nproc)
SFU_CPUS=${SFU_CPUS:-0}
LG_CPUS=${LG_CPUS:-$([ "$NCPU" -gt 1 ] && echo "1-$((NCPU - 1))" || echo 0)}
DURATION=${DURATION:-10}
FANOUT_SUBS=${FANOUT_SUBS:-150}
AUDIO_PUBS=${AUDIO_PUBS:-20}
AUDIO_SUBS=${AUDIO_SUBS:-25}
RAMP_RATE=${RAMP_RATE:-10}
RAMP_SECONDS=${RAMP_SECONDS:-90}
RAMP_MAX_P99_MS=${RAMP_MAX_P99_MS:-50}
MULTI_PUBS=${MULTI_PUBS:-8}
# media.busy_poll_us of the half-capacity case run again with busy polling (0: that case is skipped).
BUSY_POLL_US=${BUSY_POLL_US:-2000}
# Seconds between the last join and the window of the half-capacity cases, which measure the
# steady state that the latency target is about (the joins' keyframe storm still shows in their
# per-second timeline).
SETTLE=${SETTLE:-3}
MEETING=${MEETING:-0}
MEETING_PARTICIPANTS=${MEETING_PARTICIPANTS:-6}
HTTP_PORT=${HTTP_PORT:-18480}
MEDIA_PORT=${MEDIA_PORT:-42000}
PROFILE=${PROFILE:-0}
RESULTS=${RESULTS:-perf/RESULTS.md}
CHARTS=${CHARTS:-perf/charts}
OUT=${OUT:-target/perf/$(date +%Y%m%d-%H%M%S)}
# Prebuilt binaries (for an A/B of two builds) skip the build: SLUICE=/tmp/a/sluice BUILD=0.
SLUICE=${SLUICE:-target/release/sluice}
LOADGEN=${LOADGEN:-target/release/sluice-loadgen}
BUILD=${BUILD:-1}

# Number of CPUs in a taskset list such as "1-3,6".
count_cpus() {
    local n=0 part
    IFS=, read -ra parts <<<"$1"
    for part in "${parts[@]}"; do
        if [[ $part == *-* ]]; then n=$((n + ${part#*-} - ${part%-*} + 1)); else n=$((n + 1)); fi
    done
    echo "$n"
}
SFU_SHARDS=${SFU_SHARDS:-$(count_cpus "$SFU_CPUS")}
LG_CORES=${LG_CORES:-$(count_cpus "$LG_CPUS")}

mkdir -p "$OUT" "$CHARTS"
if [ "$BUILD" = 1 ]; then
    echo "== building release (sluice and sluice-loadgen)"
    cargo build --release -p sluice -p sluice-loadgen
fi

# ---- host tuning, restored on exit ----
declare -A SAVED=()
tune() {
    local key=$1 want=$2 file=/proc/sys/${1//.//}
    [ -w "$file" ] || { echo "   (cannot set $key: not writable; run as root for best results)"; return 0; }
    local cur; cur=$(cat "$file")
    if [ "$cur" -lt "$want" ]; then
        SAVED[$key]=$cur
        echo "$want" >"$file"
        echo "   $key: $cur -> $want"
    fi
}
restore() {
    local key
    for key in "${!SAVED[@]}"; do echo "${SAVED[$key]}" >"/proc/sys/${key//.//}" || true; done
}
SFU_PID=
cleanup() {
    if [ -n "$SFU_PID" ] && kill -0 "$SFU_PID" 2>/dev/null; then kill -KILL "$SFU_PID" || true; fi
    restore
}
trap cleanup EXIT
echo "== tuning (loopback datagram buffers and backlog)"
tune net.core.rmem_max 16777216
tune net.core.wmem_max 16777216
tune net.core.netdev_max_backlog 10000

MACHINE="$NCPU CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), kernel $(uname -r)"
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null | grep -v '^??' || true)" ]; then COMMIT="$COMMIT+dirty"; fi
DATE=$(date -u +%Y-%m-%dT%H:%MZ)

start_sluice() {
    local io=$1
    SLUICE_HTTP_LISTEN=127.0.0.1:$HTTP_PORT \
    SLUICE_MEDIA_PORT_BASE=$MEDIA_PORT \
    SLUICE_MEDIA_SHARDS=$SFU_SHARDS \
    SLUICE_MEDIA_LISTEN_IPS=127.0.0.1 \
    SLUICE_MEDIA_IO=$io \
    SLUICE_MEDIA_PIN_CORES=false \
    SLUICE_MEDIA_BUSY_POLL_US=${SFU_BUSY_POLL_US:-0} \
    SLUICE_TURN_ENABLED=false \
    SLUICE_LIMITS_MAX_PEERS=50000 \
    SLUICE_LOG_LEVEL=${SFU_LOG_LEVEL:-warn} \
        taskset -c "$SFU_CPUS" "$SLUICE" serve >"$OUT/sluice-$io.log" 2>&1 &
    SFU_PID=$!
    local i
    for i in $(seq 100); do
        if curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "sluice did not start; its log:" >&2
    cat "$OUT/sluice-$io.log" >&2
    exit 1
}

stop_sluice() {
    [ -n "$SFU_PID" ] || return 0
    kill -TERM "$SFU_PID" 2>/dev/null || true
    local i
    for i in $(seq 100); do kill -0 "$SFU_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SFU_PID" 2>/dev/null || true
    wait "$SFU_PID" 2>/dev/null || true
    SFU_PID=
}

ensure_results() {
    [ -f "$RESULTS" ] && return 0
    cat >"$RESULTS" <<'EOF'
# sluice capacity results

Rows are appended by `perf/capacity.sh` (see `perf/README.md`). Columns: egress packets per SFU
CPU-second (`sluice_rtp_forwarded_packets_total` over the SFU's CPU time from /proc), SFU egress
packets/s, delivered ratio, one-way latency at the subscriber's socket, join time (POST to first
media), SFU RSS growth per peer, and the load generator's own CPU share of its cores.

## Runs

| date | commit | machine | command | io | egress pps per SFU CPU-s | SFU egress pps | delivered | latency p50 / p99 / p99.9 (us) | join p50 / p99 (ms) | RSS per peer (KiB) | loadgen CPU | notes |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
EOF
}

# append_row JSON COMMAND IO [NOTE]
append_row() {
    python3 - "$1" "$2" "$3" "${4:-}" "$DATE" "$COMMIT" "$MACHINE" "$LG_CORES" >>"$RESULTS" <<'EOF'
import json, sys
path, command, io, note, date, commit, machine, lg_cores = sys.argv[1:9]
s = json.load(open(path))
def num(v, fmt="{:.0f}"):
    return "n/a" if v is None else fmt.format(v)
l, j = s["latency_us"], s["join_ms"]
notes = []
if note.startswith("@ratio:"):
    # This is the mmsg baseline; the ratio is uring's figure over this one, same run.
    try:
        u = json.load(open(note[len("@ratio:"):]))["egress_pps_per_sfu_core"]
    except OSError:
        u = None
    m = s["egress_pps_per_sfu_core"]
    notes.append("uring/mmsg egress per CPU-s = " + ("n/a" if not u or not m else f"{u / m:.2f}"))
elif note:
    notes.append(note)
mt = s.get("meeting")
if mt:
    notes.append(f"meeting: {mt['participants']} participants, {mt['pairs_receiving']} of {mt['pairs']} pairs receiving")
sc = s.get("simulcast")
if sc:
    notes.append("simulcast: subscribers on layers l/m/h " + "/".join(str(n) for n in sc["subscribers_per_layer"])
                 + f", {sc['layer_changes']} layer changes; delivered counts audio only")
fl = s.get("sfu_forward_latency_us")
if fl:
    notes.append(f"sluice's own forward latency p50/p99 {fl['p50']:.0f}/{fl['p99']:.0f} us")
st = s.get("sfu_cpu_steal")
if st is not None:
    notes.append(f"host steal on the SFU's CPU {st * 100:.1f} %")
if s.get("loadgen_saturated"):
    notes.append("loadgen saturated")
if s.get("capacity"):
    c = s["capacity"]
    notes.append(f"capacity {c['subscribers']} subscribers ({c['stopped_by']})")
fails = sum(f["count"] for f in s["failures"])
if fails:
    notes.append(f"{fails} failures: " + "; ".join(f"{f['count']}x {f['reason']}" for f in s["failures"][:3]))
window = max(s["duration_s"], 1e-9)
lg_share = s["loadgen_cpu_seconds"] / (window * max(int(lg_cores), 1))
rss = s.get("sfu_rss_per_peer_bytes")
cells = [
    date, commit, machine, f"`{command}`", io,
    num(s["egress_pps_per_sfu_core"]), num(s["sfu_egress_pps"]),
    f"{s['delivered_ratio'] * 100:.3f} %",
    f"{l['p50']} / {l['p99']} / {l['p999']}",
    f"{j['p50']:.0f} / {j['p99']:.0f}",
    num(None if rss is None else rss / 1024, "{:.1f}"),
    f"{lg_share * 100:.0f} % of {lg_cores}",
    "; ".join(notes).replace("|", "/"),
]
print("| " + " | ".join(cells) + " |")
EOF
}

json_get() { python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {'s': s}))" "$1" "$2"; }

# run_case NAME IO NOTE LOADGEN-ARGS...
run_case() {
    local name=$1 io=$2 note=$3
    shift 3
    if [ -n "${CASES:-}" ] && [[ " $CASES " != *" $name "* ]]; then
        return 0
    fi
    local json=$OUT/$name.json chart=$CHARTS/$name.svg
    echo "== $name ($io): sluice-loadgen $*"
    start_sluice "$io"
    local perf_pid=
    if [ "$PROFILE" = 1 ] && command -v perf >/dev/null; then
        # Sample the SFU for most of the window, after joins have settled.
        ( sleep $((DURATION / 2 + 5)); timeout $((DURATION / 2 + 5)) perf record -e cpu-clock ${PERF_CALLGRAPH:--g} \
            -p "$SFU_PID" -o "$OUT/$name.perf.data" -- sleep $((DURATION / 2)) ) >"$OUT/$name.perf.log" 2>&1 &
        perf_pid=$!
    fi
    local rc=0
    timeout $((DURATION * 4 + RAMP_SECONDS + 300)) taskset -c "$LG_CPUS" "$LOADGEN" "$@" \
        --url "http://127.0.0.1:$HTTP_PORT" --cores "$LG_CORES" --sfu-pid "$SFU_PID" \
        --json "$json" --chart "$chart" --label "$io" --quiet || rc=$?
    [ -n "$perf_pid" ] && wait "$perf_pid" || true
    stop_sluice
    [ -f "$chart" ] && cp "$chart" "$OUT/" || true
    if [ ! -f "$json" ]; then
        echo "   $name produced no JSON (exit $rc)" >&2
        return 0
    fi
    append_row "$json" "sluice-loadgen $* --cores $LG_CORES" "$io" "$note"
    if [ -f "$OUT/$name.perf.data" ]; then
        perf report -i "$OUT/$name.perf.data" --no-children --sort symbol --stdio 2>/dev/null \
            | grep -E '^ +[0-9]' | head -40 >"$OUT/$name.profile.txt" || true
        echo "   profile: $OUT/$name.profile.txt"
    fi
}

# The machine's own latency floor on the SFU's CPU, with no SFU running (see bench/src/hiccup.rs):
# one row, its latency columns being how late a thread wakes from a 500 us sleep.
run_hiccup() {
    if [ -n "${CASES:-}" ] && [[ " $CASES " != *" hiccup "* ]]; then
        return 0
    fi
    local json=$OUT/hiccup.json first_cpu=${SFU_CPUS%%[,-]*}
    echo "== hiccup: the machine's own latency on CPU $first_cpu, no SFU"
    taskset -c "$first_cpu" "$LOADGEN" hiccup --duration "$DURATION" --json "$json"
    python3 - "$json" "$DATE" "$COMMIT" "$MACHINE" "$first_cpu" "$DURATION" >>"$RESULTS" <<'EOF2'
import json, sys
path, date, commit, machine, cpu, duration = sys.argv[1:7]
s = json.load(open(path))
w, a = s["wakeup_late_us"], s["added_latency_us"]
gaps = ", ".join(f"{n} over {us / 1000:g} ms" for us, n in s["gaps_over_us"])
note = (f"no SFU: the floor. Latency columns: lateness waking from a 500 us sleep. A spinning thread "
        f"was stalled {s['stalled_ratio'] * 100:.2f} % of the time ({gaps}; longest {s['max_gap_us'] / 1000:.1f} ms), "
        f"adding p99 {a['p99']} us / p99.9 {a['p999']} us to a random arrival")
cells = [date, commit, machine, f"`taskset -c {cpu} sluice-loadgen hiccup --duration {duration}`", "-",
         "", "", "", f"{w['p50']} / {w['p99']} / {w['p999']}", "", "", "", note]
print("| " + " | ".join(cells) + " |")
EOF2
}

# The kernel's own cost of the fan-out's egress on this machine, with no SFU (see
# bench/src/floor.rs): one row, whose egress per CPU-second is the ceiling for any SFU that sends
# each packet with its own sendmsg. Its note gives sluice's fanout-uring figure from the same run
# as a share of it.
run_floor() {
    if [ -n "${CASES:-}" ] && [[ " $CASES " != *" floor "* ]]; then
        return 0
    fi
    local json=$OUT/floor.json send_cpu=${SFU_CPUS%%[,-]*} recv_cpu=${LG_CPUS%%[,-]*}
    local cmd="sluice-loadgen floor --subscribers $FANOUT_SUBS --duration $DURATION --batch 16 --send-cpu $send_cpu --recv-cpu $recv_cpu"
    echo "== floor: the kernel's cost of a 1 x $FANOUT_SUBS fan-out's egress, no SFU"
    taskset -c "$SFU_CPUS,$LG_CPUS" "$LOADGEN" floor --subscribers "$FANOUT_SUBS" --duration "$DURATION" \
        --batch 16 --send-cpu "$send_cpu" --recv-cpu "$recv_cpu" --json "$json" || return 0
    python3 - "$json" "$OUT/fanout-uring.json" "$DATE" "$COMMIT" "$MACHINE" "$cmd" >>"$RESULTS" <<'EOF2'
import json, sys
path, fanout, date, commit, machine, cmd = sys.argv[1:7]
s = json.load(open(path))
note = (f"no SFU: the kernel floor. One thread sends each of {s['egress_pps']:.0f} packets/s of "
        f"{s['size_bytes']} B to one of {s['subscribers']} loopback sockets (sendmmsg, 16 per call) and does "
        f"nothing else: {s['ns_per_packet']:.0f} ns of CPU per packet, {s['sender_user_seconds'] / max(s['sender_cpu_seconds'], 1e-9) * 100:.0f} % of it in user space")
try:
    u = json.load(open(fanout))["egress_pps_per_sfu_core"]
    note += f"; sluice's fanout-uring in this run is {u / s['egress_pps_per_cpu_second'] * 100:.0f} % of this floor"
except (OSError, KeyError, TypeError, ZeroDivisionError):
    pass
cells = [date, commit, machine, f"`{cmd}`", "-", f"{s['egress_pps_per_cpu_second']:.0f}", f"{s['egress_pps']:.0f}",
         f"{s['delivered_ratio'] * 100:.3f} %", "", "", "", "", note]
print("| " + " | ".join(cells) + " |")
EOF2
}

ensure_results
echo "== machine: $MACHINE; sluice on CPU(s) $SFU_CPUS ($SFU_SHARDS shard(s)), loadgen on $LG_CPUS ($LG_CORES core(s)); out: $OUT"
run_hiccup

run_case fanout-uring uring "" fanout --publishers 1 --subscribers "$FANOUT_SUBS" --duration "$DURATION"
run_case fanout-mmsg mmsg "@ratio:$OUT/fanout-uring.json" fanout --publishers 1 --subscribers "$FANOUT_SUBS" --duration "$DURATION"
run_floor
# The same fan-out with every frame sent in one burst (no pacer): the worst case for latency.
run_case fanout-burst-uring uring "publisher unpaced (--pacing-factor 0)" fanout --publishers 1 --subscribers "$FANOUT_SUBS" --duration "$DURATION" --pacing-factor 0
run_case fanout-simulcast-uring uring "" fanout --publishers 1 --subscribers "$FANOUT_SUBS" --duration "$DURATION" --simulcast
run_case audio-uring uring "" audio --publishers "$AUDIO_PUBS" --subscribers "$AUDIO_SUBS" --duration "$DURATION"
run_case ramp-uring uring "" ramp --publishers 1 --rate "$RAMP_RATE" --max-p99 "$RAMP_MAX_P99_MS" --duration "$RAMP_SECONDS"
if [ -f "$OUT/ramp-uring.json" ]; then
    CAP=$(json_get "$OUT/ramp-uring.json" "(s.get('capacity') or {}).get('subscribers', 0)")
    HALF=$(( CAP / 2 ))
    if [ "$HALF" -ge 1 ]; then
        run_case fanout-half-uring uring "half of the ramp's capacity ($CAP)" \
            fanout --publishers 1 --subscribers "$HALF" --duration "$DURATION" --settle "$SETTLE"
    fi
fi
# The same ramp and half-capacity run with the subscribers spread over MULTI_PUBS publishers.
# On one SFU core a 1 x N fan-out at half capacity spends half of each inter-packet interval
# fanning out one packet (about 2.3 ms for the default publisher), so its last subscribers wait that long
# whatever the per-packet cost; with P publishers each packet's fan-out is P times shorter.
run_case ramp-multi-uring uring "$MULTI_PUBS publishers" ramp --publishers "$MULTI_PUBS" --rate "$RAMP_RATE" --max-p99 "$RAMP_MAX_P99_MS" --duration "$RAMP_SECONDS"
if [ -f "$OUT/ramp-multi-uring.json" ]; then
    CAP=$(json_get "$OUT/ramp-multi-uring.json" "(s.get('capacity') or {}).get('subscribers', 0)")
    HALF=$(( CAP / 2 / MULTI_PUBS ))
    if [ "$HALF" -ge 1 ]; then
        run_case fanout-half-multi-uring uring "half of the $MULTI_PUBS-publisher ramp's capacity ($CAP)" \
            fanout --publishers "$MULTI_PUBS" --subscribers "$HALF" --duration "$DURATION" --settle "$SETTLE"
        # The same load with busy polling: the shard spins instead of sleeping between packets,
        # so no packet waits for it to wake (its core is then always busy: the egress per
        # CPU-second of this row measures the spinning too, not the work).
        if [ "$BUSY_POLL_US" -gt 0 ]; then
            SFU_BUSY_POLL_US=$BUSY_POLL_US run_case fanout-half-multi-poll-uring uring \
                "as the row above, with media.busy_poll_us=$BUSY_POLL_US (CPU-seconds include the polling)" \
                fanout --publishers "$MULTI_PUBS" --subscribers "$HALF" --duration "$DURATION" --settle "$SETTLE"
        fi
    fi
fi
# Optional (MEETING=1, or named in CASES): N participants in one /ws room, everyone to everyone.
if [ "$MEETING" = 1 ] || [[ " ${CASES:-} " == *" meeting-uring "* ]]; then
    run_case meeting-uring uring "" meeting --participants "$MEETING_PARTICIPANTS" --duration "$DURATION"
fi
echo "== done: rows appended to $RESULTS, charts in $CHARTS/, JSON and logs in $OUT/"
