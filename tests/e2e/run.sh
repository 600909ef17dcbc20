#!/usr/bin/env bash
# Runs sluice's end-to-end tests with real clients against a running sluice.
#
#   tests/install-clients.sh                                  # once: chromium, playwright-core, aiortc, coturn
#   SLUICE_URL=http://127.0.0.1:8080 tests/e2e/run.sh         # all tests
#   SLUICE_URL=http://127.0.0.1:8080 tests/e2e/run.sh chromium-h264 aiortc-vp8   # some of them
#
# The caller starts sluice (open, no JWT; or set SLUICE_TOKEN to a token allowed to publish and
# subscribe every stream). Tests run one after another (2 cores are shared with builds):
#
#   aiortc-vp8      aiortc publishes VP8+Opus via WHIP, 2 aiortc players via WHEP decode >= 30 video
#                   and >= 50 audio frames each in 20 s; every Location DELETEd -> 200
#   chromium-vp8    headless Chromium publishes fake camera+mic (VP8 forced) via WHIP, 2 Chromium
#                   pages play via WHEP: framesDecoded > 0 and totalSamplesReceived > 0 in 20 s
#   chromium-h264   the same with H.264
#   chromium-flood  chromium-vp8's setup; once both players decode, 20,000 garbage datagrams per media
#                   port (random, truncated STUN, RTP-/DTLS-shaped, fake SRTP/SRTCP) within 2 s to
#                   127.0.0.1; then each player's framesDecoded grows >= 30 in the next 5 s, no page
#                   ever reports connectionState failed/disconnected, and /metrics
#                   drop_unknown_source + drop_malformed (all shards) grew >= half the datagrams sent
#   chromium-simulcast  Chromium publishes its fake camera at 1280x720 as 3 VP8 simulcast layers (rids
#                   q, h, f) via WHIP; an uncapped WHEP viewer decodes frameWidth 1280, a viewer with
#                   ?max_height=360 decodes and never shows a frame wider than 640
#   chromium-simulcast-tc  (tests/e2e/simulcast_netns.sh, needs root, ip, tc and SLUICE_BIN) a sluice
#                   of its own on a veth into a fresh network namespace; the WHEP viewer's Chromium runs
#                   in the namespace behind tc tbf 600kbit: it settles on a layer <= 640 wide and keeps
#                   decoding (>= 10 frames/s, <= 3 freezes), then climbs back to 1280 wide within 15 s
#                   of the limit being lifted
#   chromium-demo-page  the real demo page at /: one page clicks Publish (fake camera), another
#                   clicks Watch and decodes video with live stats; Stop deletes both sessions; then
#                   Publish with Simulcast ticked and Watch at quality low: the viewer decodes the
#                   quarter-size layer (<= 320 wide)
#   chromium-relay  chromium-vp8 with the publisher and player1 relay-only (iceTransportPolicy
#                   'relay') through sluice's TURN, with the credentials of sluice's RFC 9725 Link
#                   headers: the publisher's from OPTIONS before its offer (falling back, with a WARN
#                   in the log, to those of its 201 when OPTIONS carries none), player1's from its
#                   201 (setConfiguration before setLocalDescription); player2 connects directly.
#                   All decode; each relay-only page's selected candidate pair is local 'relay'; and
#                   /metrics sluice_turn_allocations(_total) and sluice_turn_relayed_{packets,bytes}
#                   _total in both directions grew (>= half of what those pages sent/received).
#                   Needs sluice's TURN on (SLUICE_TURN_LISTEN), reachable at the Links' host:port.
#
# Prints one line per test, 'PASS name' or 'FAIL name: reason', then exactly one line
# 'N passed, M failed'; exits 1 if any failed (2 on a usage error). Each test's full output is kept
# in $E2E_LOG_DIR (default: a fresh temp dir); failed tests' logs are also copied to stderr, and
# E2E_VERBOSE=1 streams every test's output to stderr as it runs.
#
# Environment: SLUICE_URL (required, loopback only), SLUICE_TOKEN, SLUICE_BIN (chromium-simulcast-tc), E2E_RETRIES (default 1), E2E_LOG_DIR, E2E_VERBOSE,
# E2E_TEST_TIMEOUT (seconds per test, default 120), CHROMIUM (default /usr/bin/chromium),
# SLUICE_MEDIA_PORTS (chromium-flood: every media port of sluice, e.g. 41000,41001; without it the
# flood goes to the ports in the test's SDP answers, i.e. only the shards its sessions landed on),
# E2E_FLOOD_COUNT (chromium-flood: datagrams per port, default 20000), E2E_RELAY_STRICT_OPTIONS=0
# (chromium-relay: fall back to the 201's Links when OPTIONS carries none; by default that fails).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$HERE/.venv/bin/python"
ALL_TESTS=(aiortc-vp8 chromium-vp8 chromium-h264 chromium-flood chromium-relay chromium-demo-page
           chromium-room chromium-room-whip chromium-simulcast chromium-simulcast-tc)

if [ -z "${SLUICE_URL:-}" ]; then
    echo "usage: SLUICE_URL=http://127.0.0.1:PORT $0 [test ...]   (tests: ${ALL_TESTS[*]})" >&2
    exit 2
fi
URL="${SLUICE_URL%/}"
case "$URL" in
    http://127.*|https://127.*|http://localhost[:/]*|https://localhost[:/]*|http://localhost|https://localhost|http://\[::1\]*|https://\[::1\]*) ;;
    *) echo "SLUICE_URL must point at a loopback address (127.0.0.0/8, localhost, [::1]): $URL" >&2; exit 2 ;;
esac

MEDIA_PORTS="${SLUICE_MEDIA_PORTS:-}"
MEDIA_PORTS="${MEDIA_PORTS// /}"
if [ -n "$MEDIA_PORTS" ] && ! [[ "$MEDIA_PORTS" =~ ^[0-9]{1,5}(,[0-9]{1,5})*$ ]]; then
    echo "SLUICE_MEDIA_PORTS must be a comma-separated list of UDP ports (e.g. 41000,41001): $SLUICE_MEDIA_PORTS" >&2
    exit 2
fi
FLOOD_COUNT="${E2E_FLOOD_COUNT:-20000}"
if ! [[ "$FLOOD_COUNT" =~ ^[1-9][0-9]*$ ]]; then
    echo "E2E_FLOOD_COUNT must be a positive integer: $FLOOD_COUNT" >&2
    exit 2
fi

if [ "$#" -gt 0 ]; then
    TESTS=("$@")
    for t in "${TESTS[@]}"; do
        [[ " ${ALL_TESTS[*]} " == *" $t "* ]] || { echo "unknown test '$t' (tests: ${ALL_TESTS[*]})" >&2; exit 2; }
    done
else
    TESTS=("${ALL_TESTS[@]}")
fi

# Tests run again once when they fail: chromium-simulcast-tc judges real bandwidth estimation
# (Chromium's encoder, str0m's estimator and a tc bottleneck) within fixed times, and fails
# now and then on a healthy build (tests/e2e/README.md has the rates measured). A pass on the
# second attempt says so, with the first attempt's reason; its log is kept next to the last.
RETRIED=(chromium-simulcast-tc)
RETRIES="${E2E_RETRIES:-1}"
if ! [[ "$RETRIES" =~ ^[0-9]$ ]]; then
    echo "E2E_RETRIES must be 0 to 9: $RETRIES" >&2
    exit 2
fi

LOG_DIR="${E2E_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/sluice-e2e.XXXXXX")}"
mkdir -p "$LOG_DIR"
PER_TEST_TIMEOUT="${E2E_TEST_TIMEOUT:-120}"
RUN_ID="$(date +%s)-$$"
TOKEN_ARGS=()
[ -n "${SLUICE_TOKEN:-}" ] && TOKEN_ARGS=(--token "$SLUICE_TOKEN")
echo "e2e: sluice at $URL, logs in $LOG_DIR" >&2

# What a test needs that install-clients.sh provides; empty when all is there.
missing_for() {
    case "$1" in
        aiortc-*)
            { [ -x "$PY" ] && "$PY" -c 'import aiortc' 2>/dev/null; } ||
                echo "aiortc not installed in tests/e2e/.venv: run tests/install-clients.sh" ;;
        chromium-simulcast-tc)
            if [ "$(id -u)" != 0 ]; then echo "chromium-simulcast-tc needs root (network namespaces, tc)"
            elif ! command -v tc >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
                echo "chromium-simulcast-tc needs iproute2 (ip, tc): apt-get install iproute2"
            elif ! [ -x "${SLUICE_BIN:-}" ]; then
                echo "chromium-simulcast-tc needs SLUICE_BIN, the sluice binary it starts in its own namespace"
            fi ;;&
        chromium-*)
            if ! command -v node >/dev/null 2>&1; then echo "node not found: run tests/install-clients.sh"
            elif ! [ -x "${CHROMIUM:-/usr/bin/chromium}" ]; then echo "${CHROMIUM:-/usr/bin/chromium} not found: run tests/install-clients.sh"
            elif ! (cd "$HERE" && node -e 'require("playwright-core")' 2>/dev/null); then
                echo "playwright-core not installed in tests/e2e/node_modules: run tests/install-clients.sh"
            fi ;;
    esac
}

command_for() {
    local stream="e2e-$1-$RUN_ID"
    case "$1" in
        aiortc-vp8) CMD=("$PY" "$HERE/aiortc_whip_whep.py" --url "$URL" --stream "$stream") ;;
        chromium-vp8) CMD=(node "$HERE/chromium_whip_whep.mjs" --url "$URL" --codec vp8 --stream "$stream") ;;
        chromium-h264) CMD=(node "$HERE/chromium_whip_whep.mjs" --url "$URL" --codec h264 --stream "$stream") ;;
        chromium-flood)
            # --media-ports '' makes the script ignore any SLUICE_MEDIA_PORTS and use the SDP answers
            CMD=(node "$HERE/chromium_whip_whep.mjs" --url "$URL" --codec vp8 --stream "$stream"
                 --flood --flood-count "$FLOOD_COUNT" --media-ports "$MEDIA_PORTS") ;;
        chromium-relay)
            CMD=(node "$HERE/chromium_whip_whep.mjs" --url "$URL" --codec vp8 --stream "$stream"
                 --relay publisher=options,player1=201)
            [ "${E2E_RELAY_STRICT_OPTIONS:-1}" = 1 ] && CMD+=(--strict-options) ;;
        chromium-demo-page)
            CMD=(node "$HERE/demo_page.mjs" --url "$URL" --stream "$stream") ;;
        chromium-room)
            CMD=(node "$HERE/room_page.mjs" --url "$URL" --room "$stream" --mode room)
            [ -n "${E2E_ROOM_SCREENSHOT:-}" ] && CMD+=(--screenshot "$E2E_ROOM_SCREENSHOT") ;;
        chromium-room-whip)
            CMD=(node "$HERE/room_page.mjs" --url "$URL" --room "$stream" --mode whip) ;;
        chromium-simulcast)
            CMD=(node "$HERE/chromium_simulcast.mjs" --url "$URL" --stream "$stream" --mode caps) ;;
        chromium-simulcast-tc)
            CMD=(bash "$HERE/simulcast_netns.sh") ;;
    esac
    CMD+=("${TOKEN_ARGS[@]}")
}

passed=0
failed=0
failed_logs=()
for t in "${TESTS[@]}"; do
    log="$LOG_DIR/$t.log"
    why="$(missing_for "$t")"
    if [ -n "$why" ]; then
        echo "$why" >"$log"
        echo "FAIL $t: $why"
        failed=$((failed + 1))
        continue
    fi
    command_for "$t"
    start=$(date +%s)
    attempts=1
    [[ " ${RETRIED[*]} " == *" $t "* ]] && attempts=$((1 + RETRIES))
    first_reason=""
    for attempt in $(seq 1 "$attempts"); do
        [ "$attempt" -gt 1 ] && mv "$log" "$LOG_DIR/$t.attempt$((attempt - 1)).log"
        if [ "${E2E_VERBOSE:-0}" = 1 ]; then
            timeout -k 10 "$PER_TEST_TIMEOUT" "${CMD[@]}" </dev/null 2>&1 | tee "$log" >&2
            rc=${PIPESTATUS[0]}
        else
            timeout -k 10 "$PER_TEST_TIMEOUT" "${CMD[@]}" </dev/null >"$log" 2>&1
            rc=$?
        fi
        [ "$rc" -eq 0 ] && break
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            reason="timed out after ${PER_TEST_TIMEOUT} s"
        else
            reason="$(grep -a '^FAIL: ' "$log" | tail -1 | sed 's/^FAIL: //')"
            [ -n "$reason" ] || reason="exit code $rc: $(grep -av '^\s*$' "$log" | tail -1 | cut -c1-300)"
        fi
        [ -n "$first_reason" ] || first_reason="$reason"
        [ "$attempt" -lt "$attempts" ] && echo "RETRY $t: attempt $attempt of $attempts failed: $reason"
    done
    secs=$(( $(date +%s) - start ))
    if [ "$rc" -eq 0 ]; then
        if [ -n "$first_reason" ]; then
            echo "PASS $t (attempt $attempt of $attempts; attempt 1 failed: $first_reason)"
        else
            echo "PASS $t"
        fi
        passed=$((passed + 1))
    else
        echo "FAIL $t: $reason"
        failed=$((failed + 1))
        failed_logs+=("$log")
    fi
    echo "e2e: $t took ${secs} s" >&2
done

for log in "${failed_logs[@]}"; do
    {
        echo "---- $log (last 40 lines)"
        tail -n 40 "$log" | cut -c1-2000 | sed 's/^/  | /'
    } >&2
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
