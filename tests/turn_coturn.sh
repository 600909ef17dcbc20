#!/usr/bin/env bash
# sluice's embedded STUN/TURN server against coturn's own test tools (Debian package `coturn`:
# turnutils_stunclient, turnutils_uclient, turnutils_peer), all on loopback.
#
# Starts sluice twice (`target/debug/sluice serve`, built here unless SLUICE_BIN names a binary):
#   1. defaults (loopback peers refused): relaying to 127.0.0.1 must be refused (403);
#   2. with SLUICE_TURN_ALLOW_LOOPBACK_PEERS=true: the reflexive address, relaying to a
#      turnutils_peer over UDP and TCP and client-to-client with 0 lost packets, Send
#      indications, a static user, and wrong credentials refused.
# Prints `PASS name` / `FAIL name: reason`, then exactly one line `N passed, M failed`; exits
# non-zero when anything failed. Every command is under `timeout`; the whole run takes ~30 s.
#
# Environment: SLUICE_BIN=path (skip the build), TURN_TEST_KEEP=1 (keep logs in $WORK).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "PASS $1"; }
fail() { failed=$((failed + 1)); echo "FAIL $1: $2"; }
finish() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit $?
}

for tool in turnutils_stunclient turnutils_uclient turnutils_peer; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        fail "tools" "$tool not found (apt-get install -y coturn, or tests/install-clients.sh)"
        finish
    fi
done

if [ -z "${SLUICE_BIN:-}" ]; then
    if ! cargo build --quiet --bin sluice; then
        fail "build" "cargo build --bin sluice failed"
        finish
    fi
    SLUICE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/sluice"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/sluice-turn-test.XXXXXX")"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    wait 2>/dev/null
    if [ -z "${TURN_TEST_KEEP:-}" ]; then rm -rf "$WORK"; else echo "logs kept in $WORK"; fi
}
trap cleanup EXIT

SECRET="turn-test-$RANDOM$RANDOM"
BASE=$((20000 + (RANDOM % 400) * 20))
PEER_PORT=$((BASE + 19))

# start_sluice NAME TURN_PORT HTTP_PORT MEDIA_PORT [extra env assignments...]
# Sets SLUICE_PID; returns non-zero (with START_ERROR) if TURN does not come up and answer a
# Binding request.
start_sluice() {
    local name=$1 turn=$2 http=$3 media=$4
    shift 4
    env SLUICE_HTTP_LISTEN="127.0.0.1:$http" \
        SLUICE_MEDIA_PORT_BASE="$media" \
        SLUICE_MEDIA_SHARDS=1 \
        SLUICE_MEDIA_LISTEN_IPS=127.0.0.1 \
        SLUICE_MEDIA_PIN_CORES=false \
        SLUICE_TURN_LISTEN="127.0.0.1:$turn" \
        SLUICE_TURN_SECRET="$SECRET" \
        SLUICE_TURN_RELAY_PORTS="$((BASE + 100))-$((BASE + 4000))" \
        SLUICE_LOG_LEVEL=info \
        "$@" "$SLUICE_BIN" serve >"$WORK/$name.log" 2>&1 &
    SLUICE_PID=$!
    PIDS+=("$SLUICE_PID")
    local up=
    for _ in $(seq 1 40); do
        if ! kill -0 "$SLUICE_PID" 2>/dev/null; then
            START_ERROR="sluice exited: $(tail -2 "$WORK/$name.log" | tr '\n' ' ')"
            return 1
        fi
        if grep -qs 'TURN listening' "$WORK/$name.log"; then
            up=1
            break
        fi
        sleep 0.25
    done
    if [ -z "$up" ]; then
        START_ERROR="no 'TURN listening' in the log within 10 s (is the TURN server wired into serve.rs?)"
        return 1
    fi
    for _ in 1 2 3; do
        if timeout 3 turnutils_stunclient -p "$turn" 127.0.0.1 >"$WORK/$name.probe" 2>&1 &&
            grep -q 'reflexive addr' "$WORK/$name.probe"; then
            return 0
        fi
    done
    START_ERROR="no answer to a STUN Binding request on 127.0.0.1:$turn"
    return 1
}

stop_sluice() {
    kill "$1" 2>/dev/null
    wait "$1" 2>/dev/null
}

# uclient NAME [uclient args...]: runs turnutils_uclient against the current TURN port; the
# output goes to $WORK/NAME.out, the exit status is returned.
uclient() {
    local name=$1
    shift
    timeout 60 turnutils_uclient "$@" -p "$TURN_PORT" 127.0.0.1 >"$WORK/$name.out" 2>&1
}

# relayed NAME: did the uclient run NAME relay everything (exit 0, 0 lost packets)?
relayed() {
    local out="$WORK/$1.out" rc=$2
    if [ "$rc" -ne 0 ]; then
        echo "turnutils_uclient exited $rc: $(grep -v '^\s*$' "$out" | tail -1)"
        return 1
    fi
    if ! grep -q 'Total lost packets 0 (0.000000%)' "$out"; then
        echo "$(grep -E 'Total lost packets' "$out" | tail -1 || echo 'no packet summary')"
        return 1
    fi
    # The final tally: as many messages came back as were sent, and some were.
    local tally sent recv
    tally=$(grep -o 'tot_send_msgs=[0-9]*, tot_recv_msgs=[0-9]*$' "$out" | tail -1)
    sent=$(echo "$tally" | sed -n 's/tot_send_msgs=\([0-9]*\),.*/\1/p')
    recv=$(echo "$tally" | sed -n 's/.*tot_recv_msgs=\([0-9]*\)/\1/p')
    if [ -z "$sent" ] || [ "$sent" -eq 0 ] || [ "$sent" != "$recv" ]; then
        echo "sent ${sent:-?} messages, ${recv:-?} came back"
        return 1
    fi
    echo "$sent/$recv messages"
    return 0
}

# Peers: turnutils_peer echoes what it receives.
turnutils_peer -L 127.0.0.1 -p "$PEER_PORT" >"$WORK/peer.log" 2>&1 &
PIDS+=("$!")
sleep 0.3

RELAY=(-n 200 -z 5 -l 170 -m 2)
START_ERROR=

# ---------------------------------------------------------------- 1. defaults: loopback refused
TURN_PORT=$((BASE + 1))
if start_sluice default "$TURN_PORT" $((BASE + 2)) $((BASE + 3)); then
    uclient refused -W "$SECRET" -u refused -e 127.0.0.1 -r "$PEER_PORT" "${RELAY[@]}"
    rc=$?
    if [ "$rc" -ne 0 ] && grep -q '403' "$WORK/refused.out"; then
        pass "loopback peer refused by default (403)"
    else
        fail "loopback peer refused by default (403)" "uclient exited $rc: $(tail -1 "$WORK/refused.out")"
    fi
    uclient refused-c2c -y -W "$SECRET" -u refused2 "${RELAY[@]}"
    rc=$?
    if [ "$rc" -ne 0 ] && grep -q '403' "$WORK/refused-c2c.out"; then
        pass "loopback relay-to-relay refused by default (403)"
    else
        fail "loopback relay-to-relay refused by default (403)" "uclient exited $rc"
    fi
    stop_sluice "$SLUICE_PID"
else
    fail "start sluice (defaults)" "$START_ERROR"
    stop_sluice "$SLUICE_PID"
fi

# ---------------------------------------------------------------- 2. loopback peers allowed
TURN_PORT=$((BASE + 5))
if start_sluice allowed "$TURN_PORT" $((BASE + 6)) $((BASE + 7)) \
    SLUICE_TURN_ALLOW_LOOPBACK_PEERS=true SLUICE_TURN_STATIC_USERS=dave:dave-pw \
    SLUICE_TURN_USER_QUOTA=50; then
    if grep -q 'UDP reflexive addr: 127.0.0.1:' "$WORK/allowed.probe"; then
        pass "stunclient reflexive address ($(grep -o 'reflexive addr: [0-9.:]*' "$WORK/allowed.probe" | head -1))"
    else
        fail "stunclient reflexive address" "$(cat "$WORK/allowed.probe")"
    fi

    uclient udp -W "$SECRET" -u alice -e 127.0.0.1 -r "$PEER_PORT" "${RELAY[@]}"
    why=$(relayed udp $?) && pass "relay to peer over UDP, 0 lost ($why)" || fail "relay to peer over UDP, 0 lost" "$why"

    uclient tcp -t -W "$SECRET" -u bob -e 127.0.0.1 -r "$PEER_PORT" "${RELAY[@]}"
    why=$(relayed tcp $?) && pass "relay to peer over TCP, 0 lost ($why)" || fail "relay to peer over TCP, 0 lost" "$why"

    uclient c2c -y -W "$SECRET" -u carol "${RELAY[@]}"
    why=$(relayed c2c $?) && pass "client-to-client over UDP, 0 lost ($why)" || fail "client-to-client over UDP, 0 lost" "$why"

    uclient c2c-tcp -y -t -W "$SECRET" -u carol2 "${RELAY[@]}"
    why=$(relayed c2c-tcp $?) && pass "client-to-client over TCP, 0 lost ($why)" || fail "client-to-client over TCP, 0 lost" "$why"

    uclient send -s -W "$SECRET" -u erin -e 127.0.0.1 -r "$PEER_PORT" "${RELAY[@]}"
    why=$(relayed send $?) && pass "Send/Data indications, 0 lost ($why)" || fail "Send/Data indications, 0 lost" "$why"

    uclient static -u dave -w dave-pw -e 127.0.0.1 -r "$PEER_PORT" "${RELAY[@]}"
    why=$(relayed static $?) && pass "static user, 0 lost ($why)" || fail "static user, 0 lost" "$why"

    uclient wrong-secret -W "not-$SECRET" -u mallory -e 127.0.0.1 -r "$PEER_PORT" -n 5 -m 1
    rc=$?
    if [ "$rc" -ne 0 ] && grep -q 'Cannot complete Allocation' "$WORK/wrong-secret.out"; then
        pass "wrong REST secret refused"
    else
        fail "wrong REST secret refused" "uclient exited $rc: $(tail -1 "$WORK/wrong-secret.out")"
    fi
    uclient wrong-password -u dave -w not-dave-pw -e 127.0.0.1 -r "$PEER_PORT" -n 5 -m 1
    rc=$?
    if [ "$rc" -ne 0 ] && grep -q 'Cannot complete Allocation' "$WORK/wrong-password.out"; then
        pass "wrong static password refused"
    else
        fail "wrong static password refused" "uclient exited $rc: $(tail -1 "$WORK/wrong-password.out")"
    fi
    stop_sluice "$SLUICE_PID"
else
    fail "start sluice (allow_loopback_peers)" "$START_ERROR"
    stop_sluice "$SLUICE_PID"
fi

finish
