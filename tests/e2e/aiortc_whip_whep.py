#!/usr/bin/env python3
"""End-to-end test of sluice's WHIP and WHEP with aiortc, an independent WebRTC stack.

One aiortc peer publishes a synthetic VP8 video track (320x240, moving) and a synthetic Opus audio
track (a 400 Hz sine) with WHIP; then N aiortc players (default 2) play the stream with WHEP and
must each decode >= --min-video video frames and >= --min-audio audio frames within --timeout
seconds. Finally every Location (players' and publisher's) is DELETEd and must answer 200.

    tests/e2e/.venv/bin/python tests/e2e/aiortc_whip_whep.py --url http://127.0.0.1:8080 --stream s1

Exit 0 on success; 1 with one line 'FAIL: <reason>' on stdout otherwise. Non-trickle: the offer is
POSTed after ICE gathering is complete. Only loopback is used: aioice's host address discovery is
replaced to return 127.0.0.1 (aioice skips it otherwise), and no STUN server is configured (aiortc's
default would be a public one). Bundle policy max-bundle, as WHIP/WHEP clients use.
"""

import argparse
import array
import asyncio
import fractions
import logging
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import aioice.ice

# Must happen before any RTCPeerConnection gathers: aioice looks the function up at call time.
aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"]

from aiortc import (  # noqa: E402
    AudioStreamTrack,
    RTCBundlePolicy,
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError  # noqa: E402
from av import AudioFrame, VideoFrame  # noqa: E402

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.2f}s] {msg}", flush=True)


class Fail(Exception):
    """A test failure with a human-readable reason."""


# --------------------------------------------------------------------------- synthetic media


class MovingVideoTrack(VideoStreamTrack):
    """320x240 yuv420p at 30 fps: a diagonal luma gradient that scrolls, plus a white square
    that moves across, and chroma that drifts, so every frame differs (a real encoder load)."""

    W, H = 320, 240

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        # a 2x-wide gradient row to slice shifted windows from without per-pixel work
        self._grad = bytes((x * 255 // self.W) & 0xFF for x in range(self.W)) * 2

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        n = self.n
        self.n += 1
        w, h = self.W, self.H
        frame = VideoFrame(width=w, height=h, format="yuv420p")
        y_plane, u_plane, v_plane = frame.planes
        shift = (n * 4) % w
        row = self._grad[shift : shift + w]
        ls = y_plane.line_size
        pad = bytes(ls - w)
        sq = 40
        sx = (n * 5) % (w - sq)
        sy = (n * 3) % (h - sq)
        white_row = row[:sx] + b"\xeb" * sq + row[sx + sq :]
        lines = []
        for yy in range(h):
            lines.append((white_row if sy <= yy < sy + sq else row) + pad)
        y_plane.update(b"".join(lines))
        u = (n * 2) & 0xFF
        v = 255 - u
        for plane, val in ((u_plane, u), (v_plane, v)):
            plane.update(bytes([val]) * plane.buffer_size)
        frame.pts = pts
        frame.time_base = time_base
        return frame


class SineAudioTrack(AudioStreamTrack):
    """48 kHz mono s16 400 Hz sine in 20 ms frames (960 samples = exactly 8 periods)."""

    RATE = 48000
    SAMPLES = 960

    def __init__(self) -> None:
        super().__init__()
        period = self.RATE // 400  # 120 samples
        one = [int(8000 * math.sin(2 * math.pi * i / period)) for i in range(period)]
        self._pcm = array.array("h", one * (self.SAMPLES // period)).tobytes()
        self._start = None
        self._ts = 0

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.time()
        else:
            self._ts += self.SAMPLES
            wait = self._start + self._ts / self.RATE - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
        frame = AudioFrame(format="s16", layout="mono", samples=self.SAMPLES)
        frame.planes[0].update(self._pcm)
        frame.pts = self._ts
        frame.sample_rate = self.RATE
        frame.time_base = fractions.Fraction(1, self.RATE)
        return frame


# --------------------------------------------------------------------------- HTTP (WHIP/WHEP)

# Never go through a proxy from the environment: the target is always loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _OPENER.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers.items()), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        text = e.read().decode("utf-8", "replace") if e.fp else ""
        return e.code, dict(e.headers.items()) if e.headers else {}, text
    except (urllib.error.URLError, OSError) as e:
        raise Fail(f"{method} {url}: cannot connect: {getattr(e, 'reason', e)}") from None


async def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    return await asyncio.to_thread(_http, method, url, body, headers)


def header(headers: dict, name: str) -> str | None:
    for k, v in headers.items():
        if k.lower() == name.lower():
            return v
    return None


def short(text: str, n: int = 200) -> str:
    text = text.strip().replace("\r", "").replace("\n", " | ")
    return text if len(text) <= n else text[:n] + "..."


class Session:
    """One WHIP or WHEP session: its peer connection and its resource URL."""

    def __init__(self, name: str, pc: RTCPeerConnection) -> None:
        self.name = name
        self.pc = pc
        self.location: str | None = None
        self.deleted = False


def force_codec(transceiver, kind: str, mime: str) -> None:
    caps = (RTCRtpSender if transceiver.direction == "sendonly" else RTCRtpReceiver).getCapabilities(kind)
    chosen = [c for c in caps.codecs if c.mimeType.lower() == mime.lower()]
    if not chosen:
        raise Fail(f"aiortc has no {mime} codec")
    # keep RTX for video so NACKed packets can be retransmitted the usual way
    rtx = [c for c in caps.codecs if c.mimeType.lower() == f"{kind}/rtx"]
    transceiver.setCodecPreferences(chosen + rtx)


async def negotiate(sess: Session, endpoint: str, args, retry_404: float = 0.0) -> str:
    """Non-trickle offer/answer against a WHIP/WHEP endpoint; returns the answer SDP."""
    pc = sess.pc
    await pc.setLocalDescription(await pc.createOffer())
    # aiortc gathers inside setLocalDescription; make sure it is complete (non-trickle).
    deadline = time.monotonic() + 10
    while pc.iceGatheringState != "complete":
        if time.monotonic() > deadline:
            raise Fail(f"{sess.name}: ICE gathering did not complete in 10 s")
        await asyncio.sleep(0.05)
    offer = pc.localDescription.sdp
    cands = re.findall(r"^a=candidate:.*$", offer, re.M)
    if not any(" 127.0.0.1 " in c for c in cands):
        raise Fail(f"{sess.name}: offer has no 127.0.0.1 candidate (candidates: {cands})")

    url = f"{args.url}/{endpoint}/{urllib.parse.quote(args.stream, safe='')}"
    hdrs = {"Content-Type": "application/sdp"}
    if args.token:
        hdrs["Authorization"] = f"Bearer {args.token}"
    give_up = time.monotonic() + retry_404
    while True:
        status, rh, body = await http("POST", url, offer.encode(), hdrs)
        if status == 404 and time.monotonic() < give_up:
            await asyncio.sleep(0.5)  # the published stream may not be registered yet
            continue
        break
    if status != 201:
        raise Fail(f"{sess.name}: POST {url} answered {status}, expected 201: {short(body)}")
    loc = header(rh, "Location")
    if not loc:
        raise Fail(f"{sess.name}: POST {url} answered 201 without a Location header")
    sess.location = urllib.parse.urljoin(url, loc)
    ctype = header(rh, "Content-Type") or ""
    if "application/sdp" not in ctype.lower():
        log(f"{sess.name}: note: answer Content-Type is {ctype!r}, expected application/sdp")
    if not body.startswith("v=0"):
        raise Fail(f"{sess.name}: POST {url} answered 201 but the body is no SDP: {short(body)}")
    # every m-line of ours must be accepted (port != 0) with the codec we forced
    for section in re.split(r"\r?\n(?=m=)", body)[1:]:
        m = re.match(r"m=(\w+) (\d+) \S+ ?([\d ]*)", section)
        if not m:
            continue
        kind, port, pts = m.group(1), m.group(2), m.group(3).split()
        if port == "0":
            raise Fail(f"{sess.name}: the answer rejects the {kind} m-line (port 0)")
        want = {"video": "VP8", "audio": "opus"}.get(kind)
        if want:
            got = {n for p, n in re.findall(r"^a=rtpmap:(\d+) ([\w-]+)/", section, re.M) if p in pts}
            if want.lower() not in {g.lower() for g in got}:
                raise Fail(f"{sess.name}: the answer's {kind} m-line has {sorted(got)}, not {want}")
    log(f"{sess.name}: {status} Location {sess.location}")
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
    except Exception as e:  # aiortc raises ValueError & co on SDP it rejects
        raise Fail(f"{sess.name}: aiortc rejected the SDP answer: {e!r}") from None
    return body


async def wait_connected(sess: Session, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sess.pc.connectionState != "connected":
        st = sess.pc.connectionState
        if st in ("failed", "closed"):
            raise Fail(f"{sess.name}: peer connection {st} (ICE {sess.pc.iceConnectionState})")
        if time.monotonic() > deadline:
            raise Fail(
                f"{sess.name}: not connected after {timeout:.0f} s "
                f"(connection {st}, ICE {sess.pc.iceConnectionState})"
            )
        await asyncio.sleep(0.05)
    log(f"{sess.name}: connected")


# --------------------------------------------------------------------------- the test


async def publish(args, sessions: list) -> Session:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))
    sess = Session("publisher", pc)
    sessions.append(sess)
    vt = pc.addTransceiver(MovingVideoTrack(), direction="sendonly")
    at = pc.addTransceiver(SineAudioTrack(), direction="sendonly")
    force_codec(vt, "video", "video/VP8")
    force_codec(at, "audio", "audio/opus")
    await negotiate(sess, "whip", args)
    await wait_connected(sess, 10)
    return sess


async def play(args, idx: int, sessions: list) -> dict:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))
    sess = Session(f"player{idx}", pc)
    sessions.append(sess)
    counts = {"video": 0, "audio": 0}
    first = {}
    got_all = asyncio.Event()
    tasks = []
    info = {"video": "", "audio": ""}

    async def consume(track: MediaStreamTrack) -> None:
        kind = track.kind
        try:
            while True:
                frame = await track.recv()
                counts[kind] += 1
                if counts[kind] == 1:
                    first[kind] = time.monotonic()
                    if kind == "video":
                        info["video"] = f"{frame.width}x{frame.height}"
                    else:
                        info["audio"] = f"{frame.sample_rate} Hz {frame.layout.name}"
                if counts["video"] >= args.min_video and counts["audio"] >= args.min_audio:
                    got_all.set()
        except MediaStreamError:
            pass

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        log(f"{sess.name}: remote {track.kind} track")
        tasks.append(asyncio.ensure_future(consume(track)))

    vt = pc.addTransceiver("video", direction="recvonly")
    at = pc.addTransceiver("audio", direction="recvonly")
    force_codec(vt, "video", "video/VP8")
    force_codec(at, "audio", "audio/opus")
    start = time.monotonic()
    # the stream may become visible to WHEP a moment after the publisher connects
    await negotiate(sess, "whep", args, retry_404=5.0)
    try:
        remaining = args.timeout - (time.monotonic() - start)
        await wait_connected(sess, max(1.0, min(10.0, remaining)))
        remaining = args.timeout - (time.monotonic() - start)
        try:
            await asyncio.wait_for(got_all.wait(), timeout=max(0.1, remaining))
        except asyncio.TimeoutError:
            raise Fail(
                f"{sess.name}: decoded {counts['video']} video frames (want >= {args.min_video}) "
                f"and {counts['audio']} audio frames (want >= {args.min_audio}) in {args.timeout:.0f} s "
                f"(connection {pc.connectionState})"
            ) from None
    finally:
        for t in tasks:
            t.cancel()
    elapsed = time.monotonic() - start
    log(
        f"{sess.name}: decoded {counts['video']} video ({info['video']}) and {counts['audio']} audio "
        f"({info['audio']}) frames, {elapsed:.1f} s after POST"
    )
    return {"video": counts["video"], "audio": counts["audio"], "seconds": round(elapsed, 1)}


async def delete_all(sessions: list, args, strict: bool) -> list:
    """DELETE every Location (players first, then the publisher). Returns problems found."""
    problems = []
    hdrs = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    for sess in sorted(sessions, key=lambda s: s.name == "publisher"):
        if not sess.location or sess.deleted:
            continue
        try:
            status, _, body = await http("DELETE", sess.location, None, hdrs)
        except Fail as e:
            problems.append(str(e))
            continue
        sess.deleted = True
        if status != 200:
            problems.append(f"{sess.name}: DELETE {sess.location} answered {status}, expected 200: {short(body)}")
        elif strict:
            log(f"{sess.name}: DELETE {sess.location} -> 200")
    return problems


async def close_all(sessions: list) -> None:
    for sess in sessions:
        try:
            await asyncio.wait_for(sess.pc.close(), timeout=3)
        except Exception:
            pass


async def run(args) -> int:
    sessions: list = []
    try:
        try:
            await publish(args, sessions)
            results = await asyncio.gather(*(play(args, i + 1, sessions) for i in range(args.players)))
        except Fail:
            await delete_all(sessions, args, strict=False)  # best effort, do not leak sessions
            raise
        problems = await delete_all(sessions, args, strict=True)
        if problems:
            raise Fail("; ".join(problems))
        print(f"OK: {args.players} players decoded {results} (VP8+Opus via WHIP/WHEP)", flush=True)
        return 0
    except Fail as e:
        print(f"FAIL: {e}", flush=True)
        return 1
    finally:
        await close_all(sessions)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="sluice base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--stream", required=True, help="stream name")
    ap.add_argument("--players", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds each player has (default 20)")
    ap.add_argument("--min-video", type=int, default=30)
    ap.add_argument("--min-audio", type=int, default=50)
    ap.add_argument("--token", default="", help="Bearer token (JWT) when sluice has auth on")
    ap.add_argument("--verbose", action="store_true", help="aiortc/aioice debug logs")
    args = ap.parse_args()
    args.url = args.url.rstrip("/")
    host = urllib.parse.urlsplit(args.url).hostname or ""
    if not (host == "localhost" or host.startswith("127.") or host == "::1"):
        print(f"FAIL: --url must be a loopback address, got {host!r}")
        return 1
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return asyncio.run(asyncio.wait_for(run(args), timeout=args.timeout + 40))
    except asyncio.TimeoutError:
        print("FAIL: the whole test took too long (hung?)", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
