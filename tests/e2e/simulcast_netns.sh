#!/usr/bin/env bash
# chromium-simulcast-tc: a Chromium WHEP viewer behind a limited link settles on a lower simulcast
# layer, keeps decoding, and climbs back to the top layer within 15 s once the limit is lifted.
#
#   SLUICE_BIN=target/debug/sluice tests/e2e/simulcast_netns.sh [--rate 600kbit]
#
# Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN), iproute2 (ip, tc), node with playwright-core and
# Chromium. It creates everything it uses and removes it on exit:
#   * a network namespace sluice-sc-<pid> joined to this one by a veth pair with the addresses
#     10.251.N.1 (here) and 10.251.N.2 (in the namespace), N picked per run;
#   * a sluice of its own, listening only on 10.251.N.1 (signaling, media, TURN);
#   * a tc tbf qdisc on the veth's host end: the viewer's downlink (default 600kbit).
# The publisher (host Chromium) and the viewer (Chromium in the namespace, via 'ip netns exec')
# talk to sluice on 10.251.N.1 only; no other address is used. Prints 'PASS ...' or 'FAIL: ...'
# (from chromium_simulcast.mjs) and exits 0 or 1; 2 when something it needs is missing.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RATE=600kbit
[ "${1:-}" = --rate ] && RATE="$2"
BIN="${SLUICE_BIN:-}"
# The sluice started here takes its settings from the command line below only: it refuses
# unknown SLUICE_* variables, such as the test runner's SLUICE_URL.
for v in $(compgen -e | grep '^SLUICE_'); do unset "$v"; done
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

missing=()
[ "$(id -u)" = 0 ] || missing+=("root (network namespaces and tc)")
command -v ip >/dev/null || missing+=("ip (iproute2)")
command -v tc >/dev/null || missing+=("tc (iproute2)")
[ -x "$BIN" ] || missing+=("SLUICE_BIN (the sluice binary; got '${BIN}')")
[ -x "$CHROMIUM" ] || missing+=("$CHROMIUM")
if [ "${#missing[@]}" -gt 0 ]; then
    echo "FAIL: missing: ${missing[*]}"
    exit 2
fi

N=$((10 + $$ % 200))
NS="sluice-sc-$$"
HOST_IF="sc$$h"
NS_IF="sc$$n"
HOST_IP="10.251.$N.1"
NS_IP="10.251.$N.2"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sluice-simulcast-tc.XXXXXX")"
SLUICE_PID=""

cleanup() {
    [ -n "$SLUICE_PID" ] && kill "$SLUICE_PID" 2>/dev/null && wait "$SLUICE_PID" 2>/dev/null
    ip link del "$HOST_IF" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

if ! { ip netns add "$NS" &&
       ip link add "$HOST_IF" type veth peer name "$NS_IF" &&
       ip link set "$NS_IF" netns "$NS" &&
       ip addr add "$HOST_IP/30" dev "$HOST_IF" && ip link set "$HOST_IF" up &&
       ip -n "$NS" addr add "$NS_IP/30" dev "$NS_IF" && ip -n "$NS" link set "$NS_IF" up &&
       ip -n "$NS" link set lo up; }; then
    echo "FAIL: could not create the network namespace and veth pair (needs CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    exit 2
fi
# The viewer's downlink: what leaves the host end of the veth.
if ! tc qdisc add dev "$HOST_IF" root tbf rate "$RATE" burst 16kbit latency 60ms; then
    echo "FAIL: tc could not add a tbf qdisc to $HOST_IF"
    exit 2
fi
echo "netns $NS: viewer at $NS_IP, sluice at $HOST_IP, downlink tbf $RATE"

# Chromium inside the namespace, for playwright (which talks to it over inherited pipes).
cat >"$WORK/chromium-in-netns" <<EOF
#!/bin/sh
exec ip netns exec $NS $CHROMIUM "\$@"
EOF
chmod +x "$WORK/chromium-in-netns"

HTTP_PORT=$((18000 + RANDOM % 1000))
MEDIA_BASE=$((46000 + (RANDOM % 400) * 4))
SLUICE_HTTP_LISTEN="$HOST_IP:$HTTP_PORT" SLUICE_MEDIA_PORT_BASE="$MEDIA_BASE" \
    SLUICE_MEDIA_SHARDS=2 SLUICE_MEDIA_LISTEN_IPS="$HOST_IP" SLUICE_LOG_LEVEL=info \
    SLUICE_TURN_LISTEN="$HOST_IP:$((HTTP_PORT + 1000))" \
    "$BIN" serve >"$WORK/sluice.log" 2>&1 &
SLUICE_PID=$!
up=1
for _ in $(seq 1 100); do
    if curl -fsS "http://$HOST_IP:$HTTP_PORT/healthz" >/dev/null 2>&1; then up=0; break; fi
    sleep 0.1
done
if [ "$up" -ne 0 ]; then
    echo "FAIL: sluice did not start:"; cat "$WORK/sluice.log"
    exit 1
fi

node "$HERE/chromium_simulcast.mjs" --url "http://$HOST_IP:$HTTP_PORT" --stream "sc-tc-$$" \
    --mode limited --page-host "$HOST_IP" --prefixes "10.251.$N." \
    --viewer-chromium "$WORK/chromium-in-netns" --lift-cmd "tc qdisc del dev $HOST_IF root"
rc=$?
echo "---- sluice's simulcast decisions"
grep -aE "simulcast layer switch|simulcast layers ranked" "$WORK/sluice.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-60,100-260 | tail -20
if [ "$rc" -ne 0 ]; then
    echo "---- sluice's forwarding and keyframe counters"
    curl -fsS "http://$HOST_IP:$HTTP_PORT/metrics" 2>/dev/null |
        grep -E '^sluice_(dropped_packets|keyframe|simulcast|rtp_forwarded)' | grep -v ' 0$'
    echo "---- sluice log (last 30 lines)"
    tail -30 "$WORK/sluice.log"
fi
exit "$rc"
