#!/usr/bin/env node
// End-to-end test of sluice's WHIP and WHEP with real headless Chromium (Debian's /usr/bin/chromium
// driven by playwright-core).
//
//   node tests/e2e/chromium_whip_whep.mjs --url http://127.0.0.1:8080 --codec vp8|h264 --stream s1
//
// One page publishes the fake camera + microphone via WHIP with the chosen video codec forced
// (setCodecPreferences) and Opus; two pages play the stream via WHEP (recvonly video + audio
// transceivers, offering everything Chromium can decode, so sluice has to pick the publisher's
// codec), attach the tracks to <video autoplay muted> / <audio autoplay> elements, and each must
// reach inbound-rtp video framesDecoded > 0 and audio totalSamplesReceived > 0 within --timeout s
// (default 20), with the video codec being the one published. Then every Location is DELETEd from
// the pages and must answer 200.
//
// The pages are served by a tiny node http server on 127.0.0.1 (an ephemeral port), so they are a
// different origin from sluice: every WHIP/WHEP request is a real cross-origin fetch with a CORS
// preflight (Content-Type application/sdp is not CORS-safelisted), and the page has to be able to
// read the Location header (Access-Control-Expose-Headers). (about:blank with page.setContent would
// not do: it is no secure context, so navigator.mediaDevices is undefined there.)
//
// The offers POSTed carry only Chromium's 127.x UDP host candidates (the rest are dropped from the
// SDP text): the machine's other interfaces are never a target of these tests.
//
// --flood (the chromium-flood test): once both players decode, a flood of garbage datagrams goes to
// every sluice media port on 127.0.0.1 while they play -- --flood-count per port (default 20000)
// within --flood-ms (default 2000), from --flood-sockets (default 4) fresh UDP sockets, mixing
// random bytes of random sizes 1-1400, truncated STUN headers (00 01 00 08 21 12 a4 42 + 0-11
// bytes), RTP-shaped junk (first byte 0x80), DTLS-shaped junk (first byte 22) and real-looking
// SRTP/SRTCP (valid RTP/RTCP headers with a steady SSRC and sequence, random payload and tag).
// Then, in the --after-ms (default 5000) after the last datagram went out, each player's video
// framesDecoded must grow by >= --min-frames (default 30); no page (publisher included) may have
// reported connectionState 'failed' or 'disconnected' at any time (every connectionstatechange is
// recorded in the page); and sluice's GET /metrics sluice_drop_unknown_source_total +
// sluice_drop_malformed_total, summed over shards, must have grown by >= half the datagrams sent
// (loopback may drop some: the kernel's Udp RcvbufErrors delta is printed too).
// The media ports are --media-ports / $SLUICE_MEDIA_PORTS ('41000,41001') when given (preferred:
// the caller knows every shard's port); otherwise the ports of the 127.0.0.1 host candidates in the
// answers of this test's sessions (only the shards these 3 sessions landed on). With explicit ports,
// every port announced in those answers must be among them, or the flood would miss the sessions.
// Datagrams only ever go to 127.0.0.1.
//
// --relay publisher=options,player1=201 (the chromium-relay test): the pages listed are relay-only
// (iceTransportPolicy 'relay') through sluice's TURN, with the ICE servers of sluice's RFC 9725
// 'Link: <turn:...>; rel="ice-server"; username=..; credential=..' headers, parsed from one header
// per link or several joined by commas (iceServersFromLinks, self-tested at start). '=options':
// OPTIONS on the endpoint before the RTCPeerConnection exists, then the usual non-trickle offer
// (relay candidates on 127.x only); when OPTIONS carries no Link the page falls back to '=201' and
// the log says WARN (--strict-options: fail instead). '=201': createOffer(), POST it, then
// setConfiguration() with the 201's Links, setLocalDescription(), setRemoteDescription(); sluice is
// ICE-lite and learns the relayed address from the checks. Once the players decode, every relay-only
// page's selected candidate pair (its transport's selectedCandidatePairId) must have a local
// candidate of type 'relay' and a 127.x remote, and GET /metrics must show the TURN server at work:
// sluice_turn_allocations_total grew by >= the number of relay-only pages, sluice_turn_allocations
// is at least that, and sluice_turn_relayed_{packets,bytes}_total grew by >= half of what those
// pages sent (direction to_peer) and received (to_client). The 201 of a relay-only page must carry
// a readable ice-server Link too.
//
// Exit 0 on success; 1 with one line 'FAIL: <reason>' on stdout otherwise. The stats seen are
// printed either way. Only loopback addresses are used.

import { chromium } from 'playwright-core';
import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import dgram from 'node:dgram';
import crypto from 'node:crypto';

const T0 = Date.now();
const log = (msg) => console.log(`[${((Date.now() - T0) / 1000).toFixed(2).padStart(6)}s] ${msg}`);

class Fail extends Error {}

const { values: opt } = parseArgs({
  options: {
    url: { type: 'string' },
    codec: { type: 'string', default: 'vp8' },
    stream: { type: 'string' },
    players: { type: 'string', default: '2' },
    timeout: { type: 'string', default: '20' },
    token: { type: 'string', default: '' },
    chromium: { type: 'string', default: process.env.CHROMIUM || '/usr/bin/chromium' },
    verbose: { type: 'boolean', default: false },
    flood: { type: 'boolean', default: false },
    'media-ports': { type: 'string', default: process.env.SLUICE_MEDIA_PORTS || '' },
    'flood-count': { type: 'string', default: '20000' },
    'flood-ms': { type: 'string', default: '2000' },
    'flood-sockets': { type: 'string', default: '4' },
    'after-ms': { type: 'string', default: '5000' },
    'min-frames': { type: 'string', default: '30' },
    relay: { type: 'string', default: '' },
    'strict-options': { type: 'boolean', default: false },
    help: { type: 'boolean', default: false },
  },
});
if (opt.help || !opt.url || !opt.stream) {
  console.log('usage: chromium_whip_whep.mjs --url http://127.0.0.1:PORT --stream NAME [--codec vp8|h264]\n' +
    '         [--players 2] [--timeout 20] [--token JWT] [--chromium /usr/bin/chromium] [--verbose]\n' +
    '         [--flood [--media-ports P1,P2,..] [--flood-count 20000] [--flood-ms 2000] [--flood-sockets 4]\n' +
    '                  [--after-ms 5000] [--min-frames 30]]\n' +
    '         [--relay publisher[=options|201][,player1[=options|201],..] [--strict-options]]');
  process.exit(opt.help ? 0 : 1);
}
const BASE = opt.url.replace(/\/+$/, '');
const CODEC = opt.codec.toLowerCase();
const PLAYERS = Number(opt.players);
const TIMEOUT_MS = Number(opt.timeout) * 1000;
const FLOOD = {
  count: Number(opt['flood-count']), ms: Number(opt['flood-ms']), sockets: Number(opt['flood-sockets']),
  afterMs: Number(opt['after-ms']), minFrames: Number(opt['min-frames']),
  ports: opt['media-ports'].trim() ? opt['media-ports'].split(',').map((p) => p.trim()) : null,
};
if (opt.flood) {
  const bad = Object.entries(FLOOD).filter(([k, v]) => k !== 'ports' && !(Number.isInteger(v) && v > 0));
  if (bad.length) {
    console.log(`FAIL: flood options must be positive integers: ${bad.map(([k, v]) => `${k}=${v}`).join(', ')}`);
    process.exit(1);
  }
  if (FLOOD.ports) {
    if (!FLOOD.ports.every((p) => /^\d+$/.test(p) && Number(p) >= 1 && Number(p) <= 65535)) {
      console.log(`FAIL: --media-ports / SLUICE_MEDIA_PORTS must be a comma-separated list of UDP ports, got '${opt['media-ports']}'`);
      process.exit(1);
    }
    FLOOD.ports = [...new Set(FLOOD.ports.map(Number))];
  }
}
// --relay: the pages ('publisher', 'player1', ..) whose RTCPeerConnection gets
// iceTransportPolicy 'relay', each with where its iceServers come from: the Link headers of an
// OPTIONS request before the offer ('options', the default) or those of the 201 ('201').
const RELAY = new Map();
for (const item of opt.relay.split(',').map((r) => r.trim()).filter(Boolean)) {
  const [r, src = 'options'] = item.split('=');
  const n = /^player(\d+)$/.exec(r);
  if ((r !== 'publisher' && !(n && Number(n[1]) >= 1 && Number(n[1]) <= PLAYERS)) || !['options', '201'].includes(src)) {
    console.log(`FAIL: --relay takes a list of PAGE[=options|201], PAGE one of publisher, player1..player${PLAYERS}; got '${item}'`);
    process.exit(1);
  }
  RELAY.set(r, src);
}
if (!['vp8', 'h264'].includes(CODEC)) {
  console.log(`FAIL: --codec must be vp8 or h264, got ${opt.codec}`);
  process.exit(1);
}
{
  const host = new URL(BASE).hostname;
  if (!(host === 'localhost' || host.startsWith('127.') || host === '[::1]')) {
    console.log(`FAIL: --url must be a loopback address, got ${host}`);
    process.exit(1);
  }
}

// Flags from DESIGN.md "Testing with real clients"; all of them matter. --user-data-dir is given
// through launchPersistentContext (playwright refuses it in args). --no-proxy-server keeps any
// proxy from the environment out of loopback fetches.
const CHROMIUM_FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--use-fake-device-for-media-stream',
  '--use-fake-ui-for-media-stream',
  '--allow-loopback-in-peer-connection',
  '--autoplay-policy=no-user-gesture-required',
  '--no-proxy-server',
  // more for debugging, e.g. E2E_CHROMIUM_EXTRA_FLAGS='--enable-logging=stderr --vmodule=turn_port=4'
  // (with DEBUG=pw:browser to see Chromium's stderr)
  ...(process.env.E2E_CHROMIUM_EXTRA_FLAGS || '').split(/\s+/).filter(Boolean),
];

// --------------------------------------------------------------------------- RFC 9725 Link headers
// Used by the page (its source is pasted into /client.js) and checked here first against the
// shapes a Link header can take: one header per link, or several links joined by ', ' into one
// value (what fetch's headers.get() returns for repeated headers); quoted strings that hold ',' or
// ';' or escaped quotes; unquoted parameter values; parameter names in any case; rel lists.

// The RTCIceServer entries of the Link header value `value` whose rel includes 'ice-server'.
function iceServersFromLinks(value) {
  // split at the commas between links: not inside <...> nor inside a quoted string
  const links = [];
  let cur = '', quoted = false, angle = false;
  for (let i = 0; i < value.length; i++) {
    const ch = value[i];
    if (quoted) {
      cur += ch;
      if (ch === '\\' && i + 1 < value.length) cur += value[++i];
      else if (ch === '"') quoted = false;
      continue;
    }
    if (ch === '"') quoted = true;
    else if (ch === '<') angle = true;
    else if (ch === '>') angle = false;
    else if (ch === ',' && !angle) { links.push(cur); cur = ''; continue; }
    cur += ch;
  }
  links.push(cur);
  const servers = [];
  for (const link of links.map((l) => l.trim()).filter(Boolean)) {
    const m = /^<([^>]*)>(.*)$/s.exec(link);
    if (!m) continue;
    const params = {};
    const re = /;\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^;]*))?/g;
    for (let p; (p = re.exec(m[2]));) {
      let v = (p[2] || '').trim();
      if (v.startsWith('"')) v = v.slice(1, -1).replace(/\\(.)/g, '$1');
      const k = p[1].toLowerCase();
      if (!(k in params)) params[k] = v; // RFC 8288: the first occurrence counts
    }
    if (!(params.rel || '').toLowerCase().split(/\s+/).includes('ice-server')) continue;
    const s = { urls: m[1].trim() };
    if ('username' in params) s.username = params.username;
    if ('credential' in params) s.credential = params.credential;
    servers.push(s);
  }
  return servers;
}

{
  const U = '1700000000:alice', C = 'a+b/c=';
  const udp = `<turn:127.0.0.1:3478?transport=udp>; rel="ice-server"; username="${U}"; credential="${C}"; credential-type="password"`;
  const tcp = `<turn:127.0.0.1:3478?transport=tcp>; rel="ice-server"; username="${U}"; credential="${C}"; credential-type="password"`;
  const want2 = [{ urls: 'turn:127.0.0.1:3478?transport=udp', username: U, credential: C },
    { urls: 'turn:127.0.0.1:3478?transport=tcp', username: U, credential: C }];
  const cases = [
    [udp, want2.slice(0, 1)],
    [`${udp}, ${tcp}`, want2],
    [`${udp},${tcp}`, want2],
    [`</x>; rel="next", ${udp} ,  ${tcp}`, want2],
    ['<turn:h:1?transport=udp>;REL=ice-server;Username="a,b;c\\"d";CREDENTIAL=x', [{ urls: 'turn:h:1?transport=udp', username: 'a,b;c"d', credential: 'x' }]],
    ['<turn:h:1>; rel="preload ice-server"; username=u; credential=p', [{ urls: 'turn:h:1', username: 'u', credential: 'p' }]],
    ['<stun:h:1>; rel="ice-server"', [{ urls: 'stun:h:1' }]],
    ['', []],
  ];
  for (const [input, want] of cases) {
    const got = JSON.stringify(iceServersFromLinks(input));
    if (got !== JSON.stringify(want)) {
      console.log(`FAIL: the Link parser self-test: ${JSON.stringify(input)} gave ${got}, expected ${JSON.stringify(want)}`);
      process.exit(1);
    }
  }
}

// --------------------------------------------------------------------------- the page's code
// Runs inside Chromium. Kept plain (no build step) and served as /client.js.
const CLIENT_JS = iceServersFromLinks.toString() + '\n' + String.raw`
const ORIGIN_NOTE = 'fetch failed: connection refused, or the CORS preflight was not answered ' +
  'with Access-Control-Allow-Origin for ' + location.origin;

// Every connectionState the page's peer connection went through, with the time (ms since load),
// so a short 'disconnected' between two polls is not missed.
function watchStates(pc) {
  window.__states = [{ state: pc.connectionState, at: Math.round(performance.now()) }];
  pc.addEventListener('connectionstatechange', () =>
    window.__states.push({ state: pc.connectionState, at: Math.round(performance.now()) }));
}

function authHeaders(token) { return token ? { Authorization: 'Bearer ' + token } : {}; }

function waitGathering(pc, ms) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('ICE gathering did not complete in ' + ms + ' ms')), ms);
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') { clearTimeout(t); resolve(); }
    });
  });
}

function pickCodecs(kind, mime, side) {
  const all = (side === 'send' ? RTCRtpSender : RTCRtpReceiver).getCapabilities(kind).codecs;
  let want = all.filter(c => c.mimeType.toLowerCase() === mime);
  if (mime === 'video/h264') {
    // Constrained Baseline with packetization-mode=1 first: what every SFU and browser speaks.
    const score = c => (/packetization-mode=1/.test(c.sdpFmtpLine || '') ? 2 : 0) +
                       (/profile-level-id=42e0/.test(c.sdpFmtpLine || '') ? 1 : 0);
    want = want.sort((a, b) => score(b) - score(a));
  }
  const rtx = all.filter(c => c.mimeType.toLowerCase() === kind + '/rtx');
  return { want, rtx };
}

// --relay. RFC 9725 gives a client the ICE servers two ways, and the test uses both:
//  - 'options': OPTIONS on the endpoint before anything else; its Link headers become the
//    RTCPeerConnection's iceServers, and the offer (after gathering, so it carries the relay
//    candidates) is POSTed as usual;
//  - '201': the offer from createOffer() (no candidates yet: gathering starts with
//    setLocalDescription) is POSTed first; the Link headers of the 201 go into setConfiguration(),
//    then setLocalDescription() gathers relay candidates and ICE runs. sluice is ICE-lite: it learns
//    the client's (relayed) address from the client's connectivity checks, so no PATCH is needed.
// When OPTIONS yields no ice-server Link, 'options' falls back to '201' with a warning, or fails
// with cfg.strictOptions.

function relayLinks(resp) {
  const link = resp.headers.get('Link');
  const servers = link ? iceServersFromLinks(link) : [];
  return { link, iceServers: servers,
    turn: servers.filter(s => /^turns?:/i.test(s.urls) && s.username && s.credential).length,
    exposed: resp.headers.get('Access-Control-Expose-Headers') };
}

async function optionsIceServers(url, cfg) {
  let resp;
  try {
    resp = await fetch(url, { method: 'OPTIONS', headers: authHeaders(cfg.token) });
  } catch (e) {
    throw new Error('OPTIONS ' + url + ': ' + ORIGIN_NOTE + ' (' + e + ')');
  }
  return { status: resp.status, ...relayLinks(resp) };
}

// A new RTCPeerConnection; with cfg.relay only relay candidates are gathered (iceTransportPolicy
// 'relay'), from the iceServers of OPTIONS (now) or of the 201 (later, in negotiate()).
async function newPeerConnection(endpoint, cfg) {
  const conf = { bundlePolicy: 'max-bundle', iceServers: [] };
  window.__relay = null;
  if (cfg.relay) {
    conf.iceTransportPolicy = 'relay';
    const info = { asked: cfg.relay, source: cfg.relay, options: null, warning: null };
    if (cfg.relay === 'options') {
      const url = cfg.base + '/' + endpoint + '/' + encodeURIComponent(cfg.stream);
      const o = await optionsIceServers(url, cfg);
      info.options = o;
      if ((o.status === 204 || o.status === 200) && o.turn) {
        conf.iceServers = o.iceServers;
      } else {
        const why = 'OPTIONS ' + url + ' answered ' + o.status + ' with ' + (o.link ? 'no usable turn: ice-server Link in: ' +
          o.link : 'no readable Link header (none sent, or not in Access-Control-Expose-Headers: ' + o.exposed + ')') +
          '; RFC 9725 expects 204 with the ice-server Links';
        if (cfg.strictOptions) throw new Error(why);
        info.warning = why + '; falling back to the Links of the 201';
        info.source = '201';
      }
    }
    window.__relay = info;
  }
  const pc = new RTCPeerConnection(conf);
  window.__iceErrors = [];
  window.__gathered = [];
  pc.addEventListener('icecandidate', e => { if (e.candidate && e.candidate.candidate) window.__gathered.push(e.candidate.candidate); });
  pc.addEventListener('icecandidateerror', e => window.__iceErrors.push(
    { url: e.url, errorCode: e.errorCode, errorText: e.errorText, address: e.address, port: e.port }));
  return pc;
}

async function postOffer(url, sdp, cfg, retry404Ms) {
  const giveUp = Date.now() + retry404Ms;
  let resp;
  for (;;) {
    try {
      resp = await fetch(url, { method: 'POST', body: sdp, headers:
        { 'Content-Type': 'application/sdp', ...authHeaders(cfg.token) } });
    } catch (e) {
      throw new Error('POST ' + url + ': ' + ORIGIN_NOTE + ' (' + e + ')');
    }
    if (resp.status === 404 && Date.now() < giveUp) { await new Promise(r => setTimeout(r, 500)); continue; }
    break;
  }
  const body = await resp.text();
  if (resp.status !== 201)
    throw new Error('POST ' + url + ' answered ' + resp.status + ', expected 201: ' + body.slice(0, 200));
  const loc = resp.headers.get('Location');
  if (!loc)
    throw new Error('POST ' + url + ' answered 201 but the page cannot read Location: missing, or not in ' +
      'Access-Control-Expose-Headers (exposed: ' + resp.headers.get('Access-Control-Expose-Headers') + ')');
  if (!body.startsWith('v=0')) throw new Error('POST ' + url + ' answered 201 but the body is no SDP: ' + body.slice(0, 200));
  window.__location = new URL(loc, url).href;
  window.__answer = body;
  window.__links201 = relayLinks(resp); // RFC 9725: the 201 carries the ice-server Links too
  return body;
}

function relayOnlyNoCandidate(pc) {
  return new Error('relay-only, yet no UDP relay candidate on 127.x was gathered from ' +
    JSON.stringify(pc.getConfiguration().iceServers.map(s => s.urls)) + '; candidates: [' +
    window.__gathered.join(' | ') + ']; icecandidateerror events: ' + JSON.stringify(window.__iceErrors));
}

const RELAY_CAND = /^(a=)?candidate:\S+ \d+ udp \d+ 127\.\d+\.\d+\.\d+ \d+ typ relay/i;
const HOST_CAND = /^(a=)?candidate:\S+ \d+ udp \d+ 127\.\d+\.\d+\.\d+ \d+ typ host/i;

async function negotiate(pc, endpoint, cfg, retry404Ms) {
  const url = cfg.base + '/' + endpoint + '/' + encodeURIComponent(cfg.stream);
  const relay = window.__relay;
  let body;
  if (relay && relay.source === '201') {
    const offer = await pc.createOffer();
    body = await postOffer(url, offer.sdp, cfg, retry404Ms);
    if (!window.__links201.turn)
      throw new Error('relay-only from the 201, but POST ' + url + ' answered 201 without a usable ice-server Link (' +
        (window.__links201.link || 'none readable; exposed: ' + window.__links201.exposed) + ')');
    pc.setConfiguration({ ...pc.getConfiguration(), iceServers: window.__links201.iceServers });
    await pc.setLocalDescription(offer);
    try {
      await pc.setRemoteDescription({ type: 'answer', sdp: body });
    } catch (e) {
      throw new Error('Chromium rejected the SDP answer: ' + e);
    }
    await waitGathering(pc, 10000);
    if (!window.__gathered.some(c => RELAY_CAND.test(c))) throw relayOnlyNoCandidate(pc);
    window.__offerCandidates = window.__gathered.filter(c => RELAY_CAND.test(c));
  } else {
    await pc.setLocalDescription();
    await waitGathering(pc, 10000);
    // Offer only the 127.x UDP host candidates (or, relay-only, the relay candidates on 127.x):
    // this machine's other interfaces (and IPv6) are no target of these tests, and sluice then
    // sees exactly what a loopback-only deployment sees.
    const all = pc.localDescription.sdp;
    const keep = relay ? RELAY_CAND : HOST_CAND;
    const offer = all.split('\r\n').filter(l => !l.startsWith('a=candidate:') || keep.test(l)).join('\r\n');
    if (relay) {
      if (!/^a=candidate:.* typ relay/m.test(offer)) throw relayOnlyNoCandidate(pc);
    } else if (!/^a=candidate:.* 127\.0\.0\.1 /m.test(offer)) {
      throw new Error('the offer has no 127.0.0.1 candidate (is --allow-loopback-in-peer-connection on?): ' +
        (all.match(/^a=candidate:.*$/mg) || []).join(' | '));
    }
    window.__offerCandidates = (offer.match(/^a=candidate:.*$/mg) || []);
    body = await postOffer(url, offer, cfg, retry404Ms);
    try {
      await pc.setRemoteDescription({ type: 'answer', sdp: body });
    } catch (e) {
      throw new Error('Chromium rejected the SDP answer: ' + e);
    }
  }
  return { location: window.__location, answerMlines: (body.match(/^m=.*$/mg) || []),
    relay, links201: window.__links201, offerCandidates: window.__offerCandidates };
}

window.whipPublish = async (cfg) => {
  let ms;
  try {
    ms = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480, frameRate: 30 }, audio: true });
  } catch (e) { throw new Error('getUserMedia failed: ' + e); }
  const pc = await newPeerConnection('whip', cfg);
  window.__pc = pc;
  watchStates(pc);
  const vt = pc.addTransceiver(ms.getVideoTracks()[0], { direction: 'sendonly' });
  const at = pc.addTransceiver(ms.getAudioTracks()[0], { direction: 'sendonly' });
  // Force the codec. The spec checks the list against the receiver's capabilities, older Chromium
  // against the sender's: try the encoder's list first, then the decoder's.
  let forced = null;
  for (const side of ['send', 'recv']) {
    const v = pickCodecs('video', 'video/' + cfg.codec, side);
    if (!v.want.length) continue;
    try { vt.setCodecPreferences([...v.want, ...v.rtx]); forced = v.want; break; } catch (e) { /* next */ }
  }
  if (!forced) throw new Error('this Chromium cannot send ' + cfg.codec + ' (setCodecPreferences refused it)');
  at.setCodecPreferences(pickCodecs('audio', 'audio/opus', 'recv').want);
  return await negotiate(pc, 'whip', cfg, 0);
};

window.whepPlay = async (cfg) => {
  const pc = await newPeerConnection('whep', cfg);
  window.__pc = pc;
  watchStates(pc);
  pc.addTransceiver('video', { direction: 'recvonly' });
  pc.addTransceiver('audio', { direction: 'recvonly' });
  pc.ontrack = (e) => {
    const el = document.createElement(e.track.kind === 'video' ? 'video' : 'audio');
    el.autoplay = true;
    if (e.track.kind === 'video') { el.muted = true; el.playsInline = true; }
    el.id = 'remote-' + e.track.kind;
    el.srcObject = new MediaStream([e.track]);
    document.body.appendChild(el);
    el.play().catch(err => { window.__playErrors = (window.__playErrors || []).concat(String(err)); });
  };
  return await negotiate(pc, 'whep', cfg, cfg.retry404Ms);
};

function pairInfo(p, l, r, via) {
  return {
    via: via || 'nominated', state: p.state, nominated: p.nominated,
    bytesSent: p.bytesSent, bytesReceived: p.bytesReceived,
    local: l ? { candidateType: l.candidateType, address: l.address, port: l.port, protocol: l.protocol,
                 relayProtocol: l.relayProtocol, url: l.url } : null,
    remote: r ? { candidateType: r.candidateType, address: r.address, port: r.port, protocol: r.protocol } : null,
  };
}

// A compact summary of getStats() for the test to judge and print.
window.statsSummary = async () => {
  const pc = window.__pc;
  if (!pc) return null;
  const report = await pc.getStats();
  const byId = new Map();
  report.forEach(s => byId.set(s.id, s));
  const codecOf = s => { const c = s.codecId && byId.get(s.codecId); return c ? c.mimeType : undefined; };
  const out = { connectionState: pc.connectionState, iceConnectionState: pc.iceConnectionState };
  report.forEach(s => {
    if (s.type === 'inbound-rtp') {
      out['in_' + s.kind] = s.kind === 'video'
        ? { codec: codecOf(s), packetsReceived: s.packetsReceived, packetsLost: s.packetsLost,
            bytesReceived: s.bytesReceived, framesReceived: s.framesReceived, framesDecoded: s.framesDecoded,
            keyFramesDecoded: s.keyFramesDecoded, frameWidth: s.frameWidth, frameHeight: s.frameHeight,
            pliCount: s.pliCount, nackCount: s.nackCount, decoderImplementation: s.decoderImplementation }
        : { codec: codecOf(s), packetsReceived: s.packetsReceived, packetsLost: s.packetsLost,
            bytesReceived: s.bytesReceived, totalSamplesReceived: s.totalSamplesReceived,
            concealedSamples: s.concealedSamples, audioLevel: s.audioLevel, totalAudioEnergy: s.totalAudioEnergy };
    } else if (s.type === 'outbound-rtp') {
      out['out_' + s.kind] = s.kind === 'video'
        ? { codec: codecOf(s), packetsSent: s.packetsSent, bytesSent: s.bytesSent, framesEncoded: s.framesEncoded,
            keyFramesEncoded: s.keyFramesEncoded, frameWidth: s.frameWidth, frameHeight: s.frameHeight,
            pliCount: s.pliCount, nackCount: s.nackCount, encoderImplementation: s.encoderImplementation }
        : { codec: codecOf(s), packetsSent: s.packetsSent, bytesSent: s.bytesSent };
    } else if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') {
      const l = byId.get(s.localCandidateId), r = byId.get(s.remoteCandidateId);
      out.pair = (l ? l.address + ':' + l.port + '/' + l.protocol : '?') + ' -> ' + (r ? r.address + ':' + r.port : '?');
      if (l) out.pair += ' (' + l.candidateType + (l.relayProtocol ? ' over ' + l.relayProtocol : '') + ')';
      if (!out.selected) out.selected = pairInfo(s, l, r);
    } else if (s.type === 'local-candidate') {
      out.localCandidateTypes = out.localCandidateTypes || {};
      out.localCandidateTypes[s.candidateType] = (out.localCandidateTypes[s.candidateType] || 0) + 1;
      if (s.candidateType === 'relay')
        (out.relayCandidates = out.relayCandidates || []).push(s.address + ':' + s.port + ' via ' + s.relayProtocol);
    }
  });
  // The selected pair: the transport's selectedCandidatePairId (what media uses), else the
  // nominated succeeded pair above.
  report.forEach(s => {
    if (s.type !== 'transport' || !s.selectedCandidatePairId) return;
    const p = byId.get(s.selectedCandidatePairId);
    if (p) out.selected = pairInfo(p, byId.get(p.localCandidateId), byId.get(p.remoteCandidateId), 'transport');
  });
  if (window.__iceErrors && window.__iceErrors.length) out.iceErrors = window.__iceErrors.slice(0, 10);
  if (window.__relay) out.relaySource = window.__relay.source;
  const v = document.getElementById('remote-video');
  if (v) out.videoElement = { w: v.videoWidth, h: v.videoHeight, paused: v.paused };
  const au = document.getElementById('remote-audio');
  if (au) out.audioElement = { paused: au.paused };
  if (window.__playErrors) out.playErrors = window.__playErrors;
  out.states = (window.__states || []).map(s => s.state).join('>');
  return out;
};

window.deleteSession = async (token) => {
  const url = window.__location;
  if (!url) return { skipped: true };
  try {
    const r = await fetch(url, { method: 'DELETE', headers: authHeaders(token) });
    const text = await r.text();
    window.__location = null;
    return { url, status: r.status, body: text.slice(0, 200) };
  } catch (e) {
    return { url, status: 0, body: ORIGIN_NOTE + ' (' + e + ')' };
  }
};
`;

const PAGE_HTML = `<!doctype html><html><head><meta charset="utf-8"><title>sluice e2e</title></head>
<body><script src="/client.js"></script></body></html>`;

// --------------------------------------------------------------------------- helpers

function startPageServer() {
  return new Promise((resolve, reject) => {
    const srv = http.createServer((req, res) => {
      if (req.url === '/client.js') {
        res.writeHead(200, { 'Content-Type': 'text/javascript' });
        res.end(CLIENT_JS);
      } else if (req.url === '/favicon.ico') {
        res.writeHead(204);
        res.end();
      } else if (req.url === '/' || req.url.startsWith('/?')) {
        res.writeHead(200, { 'Content-Type': 'text/html' });
        res.end(PAGE_HTML);
      } else {
        res.writeHead(404);
        res.end();
      }
    });
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => resolve(srv));
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const errText = (e) => String(e && e.message ? e.message : e).replace(/^Error: /, '').split('\n')[0];

async function evalOr(page, name, fn, arg) {
  try {
    return await page.evaluate(fn, arg);
  } catch (e) {
    throw new Fail(`${name}: ${errText(e).replace(/^page\.evaluate: (Error: )?/, '')}`);
  }
}

// --------------------------------------------------------------------------- the flood (--flood)

const FLOOD_TARGET = '127.0.0.1'; // the only address the flood ever goes to

// The 127.0.0.1 host candidate ports in an SDP answer.
function answerPorts(sdp) {
  const out = new Set();
  for (const m of (sdp || '').matchAll(/^a=candidate:\S+ \d+ udp \d+ 127\.0\.0\.1 (\d+) typ host/gim)) out.add(Number(m[1]));
  return out;
}

// sluice's GET /metrics, summed over shards, as { unknown_source, malformed, datagrams_in,
// rtc_rejected, peers_removed }. Reads both namings: one family per counter
// (sluice_drop_unknown_source_total{shard="0"}, sluice_drop_malformed_total, ...) and labelled
// families (sluice_dropped_packets_total{reason="unknown_source",shard="0"}, ...).
async function scrapeMetrics() {
  let resp;
  try {
    resp = await fetch(BASE + '/metrics', { headers: opt.token ? { Authorization: 'Bearer ' + opt.token } : {} });
  } catch (e) {
    throw new Fail(`GET ${BASE}/metrics: ${errText(e)}`);
  }
  const text = await resp.text();
  if (resp.status !== 200) throw new Fail(`GET ${BASE}/metrics answered ${resp.status}: ${text.slice(0, 200)}`);
  const samples = [];
  for (const m of text.matchAll(/^sluice_([a-zA-Z0-9_:]+)(?:\{([^}]*)\})? (\S+)(?: \d+)?$/gm)) {
    const labels = Object.fromEntries([...(m[2] || '').matchAll(/(\w+)="([^"]*)"/g)].map((l) => [l[1], l[2]]));
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  const sum = (name, want = {}) => {
    const hit = samples.filter((x) => x.name === name && Object.entries(want).every(([k, v]) => x.labels[k] === v));
    return hit.length ? hit.reduce((a, x) => a + x.value, 0) : null;
  };
  return { samples, sum };
}

async function readMetrics() {
  const { sum } = await scrapeMetrics();
  const either = (...vals) => vals.find((v) => v !== null) ?? null;
  const out = {
    unknown_source: either(sum('drop_unknown_source_total'), sum('dropped_packets_total', { reason: 'unknown_source' })),
    malformed: either(sum('drop_malformed_total'), sum('dropped_packets_total', { reason: 'malformed' })),
    datagrams_in: either(sum('media_datagrams_received_total'), sum('media_packets_total', { direction: 'in' })),
    rtc_rejected: either(sum('drop_rtc_rejected_total'), sum('dropped_packets_total', { reason: 'decrypt' })),
    peers_removed: sum('peers_removed_total'),
  };
  for (const k of ['unknown_source', 'malformed']) {
    if (out[k] === null)
      throw new Fail(`GET ${BASE}/metrics has neither sluice_drop_${k}_total nor sluice_dropped_packets_total{reason="${k}"}`);
  }
  return out;
}

// sluice's TURN counters (src/turn/mod.rs write_prometheus), or a Fail naming what is missing.
async function readTurnMetrics() {
  const { sum } = await scrapeMetrics();
  const out = {
    allocations: sum('turn_allocations'),
    allocations_total: sum('turn_allocations_total'),
    packets_to_peer: sum('turn_relayed_packets_total', { direction: 'to_peer' }),
    packets_to_client: sum('turn_relayed_packets_total', { direction: 'to_client' }),
    bytes_to_peer: sum('turn_relayed_bytes_total', { direction: 'to_peer' }),
    bytes_to_client: sum('turn_relayed_bytes_total', { direction: 'to_client' }),
    refused_peers: sum('turn_refused_peers_total'),
    dropped: sum('turn_dropped_total'),
  };
  const missing = Object.entries(out).filter(([k, v]) => v === null && k !== 'refused_peers' && k !== 'dropped');
  if (missing.length)
    throw new Fail(`GET ${BASE}/metrics lacks sluice_turn_{allocations,allocations_total,relayed_packets_total{direction},` +
      `relayed_bytes_total{direction}}: missing ${missing.map(([k]) => k).join(', ')} (is TURN on?)`);
  return out;
}

// The kernel's UDP counters (this host, every socket): only to explain a shortfall.
function kernelUdp() {
  try {
    const lines = fs.readFileSync('/proc/net/snmp', 'utf8').split('\n').filter((l) => l.startsWith('Udp:'));
    const [names, values] = lines.map((l) => l.split(/\s+/).slice(1));
    return Object.fromEntries(names.map((n, i) => [n, Number(values[i])]));
  } catch {
    return {};
  }
}

// One garbage datagram; `n` picks the kind, `rtp` carries the fake SRTP stream's state.
function junk(n, pool, rtp) {
  const rnd = (lo, hi) => lo + crypto.randomInt(hi - lo + 1);
  const rest = (len) => { const o = crypto.randomInt(pool.length - len + 1); return pool.subarray(o, o + len); };
  switch (n % 5) {
    case 0: // random bytes, random size 1..1400
      return { kind: 'random', buf: Buffer.from(rest(rnd(1, 1400))) };
    case 1: // a STUN binding request header, cut short (0..11 more bytes: never a full 20-byte header)
      return { kind: 'stun-truncated', buf: Buffer.concat([Buffer.from([0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42]), rest(rnd(0, 11))]) };
    case 2: { // RTP-shaped: first byte 0x80, random rest
      const b = Buffer.from(rest(rnd(1, 1400)));
      b[0] = 0x80;
      return { kind: 'rtp-shaped', buf: b };
    }
    case 3: { // DTLS-shaped: first byte 22 (handshake), random rest
      const b = Buffer.from(rest(rnd(1, 1400)));
      b[0] = 22;
      return { kind: 'dtls-shaped', buf: b };
    }
    default: { // real-looking SRTP (steady SSRC, running seq/timestamp, 10-byte tag) or SRTCP (SR)
      if (n % 10 === 4) {
        const b = Buffer.from(rest(rnd(40, 1200)));
        rtp.seq = (rtp.seq + 1) & 0xffff;
        if (rtp.seq % 3 === 0) rtp.ts = (rtp.ts + 3000) >>> 0;
        b[0] = 0x90; // V=2, X=1 (a header extension, as browsers send)
        b[1] = 96 | (rtp.seq % 3 === 2 ? 0x80 : 0);
        b.writeUInt16BE(rtp.seq, 2);
        b.writeUInt32BE(rtp.ts, 4);
        b.writeUInt32BE(rtp.ssrc, 8);
        b.writeUInt16BE(0xbede, 12);
        b.writeUInt16BE(1, 14);
        return { kind: 'srtp-like', buf: b };
      }
      const b = Buffer.from(rest(rnd(28, 120)));
      b[0] = 0x80; // V=2, RC=0
      b[1] = 200; // SR
      b.writeUInt16BE(6, 2);
      b.writeUInt32BE(rtp.ssrc, 4);
      return { kind: 'srtcp-like', buf: b };
    }
  }
}

// Sends FLOOD.count datagrams to every port (interleaved, paced evenly over FLOOD.ms) from
// FLOOD.sockets fresh sockets; resolves once the kernel took (or refused) every one of them.
async function sendFlood(ports) {
  const socks = [];
  for (let i = 0; i < FLOOD.sockets; i++) {
    const s = dgram.createSocket({ type: 'udp4', sendBufferSize: 4 << 20 });
    await new Promise((resolve, reject) => { s.once('error', reject); s.bind(0, FLOOD_TARGET, resolve); });
    s.on('error', (e) => log(`flood socket error: ${errText(e)}`));
    socks.push(s);
  }
  const pool = crypto.randomBytes(1 << 20);
  const rtp = { seq: crypto.randomInt(65536), ts: crypto.randomInt(2 ** 32), ssrc: crypto.randomInt(2 ** 32) };
  const total = FLOOD.count * ports.length;
  const byKind = {};
  const errors = {};
  let queued = 0, sent = 0, failed = 0, bytes = 0;
  const t0 = Date.now();
  let allDone;
  const done = new Promise((r) => { allDone = r; });
  const onSent = (err) => {
    if (err) { failed++; errors[err.code || err.message] = (errors[err.code || err.message] || 0) + 1; } else sent++;
    if (sent + failed === total) allDone();
  };
  while (queued < total) {
    const due = Math.min(total, Math.ceil(((Date.now() - t0 + 10) / FLOOD.ms) * total));
    for (; queued < due; queued++) {
      const port = ports[queued % ports.length];
      const { kind, buf } = junk(Math.floor(queued / ports.length), pool, rtp);
      byKind[kind] = (byKind[kind] || 0) + 1;
      bytes += buf.length;
      socks[queued % socks.length].send(buf, port, FLOOD_TARGET, onSent);
    }
    await sleep(10);
  }
  const queuedMs = Date.now() - t0;
  await Promise.race([done, sleep(10000)]);
  const ms = Date.now() - t0;
  for (const s of socks) s.close();
  return { total, sent, failed, errors, bytes, byKind, queuedMs, ms, sources: socks.length };
}

// While the players decode: flood every media port, then check that they still decode, that no
// page's connection failed or disconnected, and that sluice counted the garbage as drops.
async function floodPhase(pub, players, lastStats) {
  const named = [['publisher', pub], ...players.map((p, i) => [`player${i + 1}`, p])];

  // -- which ports
  const announced = new Set();
  for (const [name, page] of named) {
    const sdp = await evalOr(page, name, () => window.__answer);
    for (const p of answerPorts(sdp)) announced.add(p);
  }
  let ports;
  if (FLOOD.ports) {
    ports = FLOOD.ports;
    const missed = [...announced].filter((p) => !ports.includes(p));
    if (missed.length)
      throw new Fail(`the answers announce media port(s) ${missed.join(',')} on 127.0.0.1, not in --media-ports/SLUICE_MEDIA_PORTS ` +
        `${ports.join(',')}: the flood would miss these sessions`);
    log(`flood: media ports ${ports.join(',')} (from --media-ports/SLUICE_MEDIA_PORTS; the answers announce ${[...announced].join(',')})`);
  } else {
    ports = [...announced].sort((a, b) => a - b);
    if (!ports.length) throw new Fail('no 127.0.0.1 host candidate in any answer, and no --media-ports/SLUICE_MEDIA_PORTS: no port to flood');
    log(`flood: media ports ${ports.join(',')} (from the answers' 127.0.0.1 host candidates: only the shards ` +
      `these sessions are on; set SLUICE_MEDIA_PORTS to flood every shard)`);
  }

  // -- before
  const stat = async (name, page) => (lastStats[name] = await evalOr(page, name, () => window.statsSummary()));
  const frames = async () => {
    const out = {};
    for (const [name, page] of named.slice(1)) out[name] = (await stat(name, page)).in_video?.framesDecoded ?? 0;
    return out;
  };
  const m0 = await readMetrics();
  const k0 = kernelUdp();
  const f0 = await frames();
  log(`flood: before: framesDecoded ${JSON.stringify(f0)}; sluice drops unknown_source ${m0.unknown_source}, ` +
    `malformed ${m0.malformed}; datagrams received ${m0.datagrams_in}`);

  // -- the flood
  const r = await sendFlood(ports);
  const f1 = await frames();
  const tFloodEnd = Date.now();
  log(`flood: ${r.sent} datagrams (${(r.bytes / 1e6).toFixed(1)} MB) sent to ${FLOOD_TARGET}:${ports.join(',')} ` +
    `(${FLOOD.count} per port) from ${r.sources} sockets, queued in ${r.queuedMs} ms, all out in ${r.ms} ms; ` +
    `${r.failed} refused by the kernel ${JSON.stringify(r.errors)}; kinds ${JSON.stringify(r.byKind)}`);
  log(`flood: framesDecoded during the flood: ${Object.keys(f1).map((n) => `${n} +${f1[n] - f0[n]}`).join(', ')}`);
  if (r.sent === 0) throw new Fail(`flood: no datagram could be sent (${JSON.stringify(r.errors)})`);

  // -- the after-window: poll about once a second, for the log
  let f2;
  for (;;) {
    const left = tFloodEnd + FLOOD.afterMs - Date.now();
    if (left <= 0) break;
    await sleep(Math.min(1000, left));
    const f = await frames();
    if (Date.now() - tFloodEnd >= FLOOD.afterMs) { f2 = f; break; }
    log(`flood: +${((Date.now() - tFloodEnd) / 1000).toFixed(1)} s: ` +
      Object.keys(f).map((n) => `${n} +${f[n] - f1[n]}`).join(', '));
  }
  f2 ??= await frames();
  const afterS = ((Date.now() - tFloodEnd) / 1000).toFixed(1);
  for (const [name, page] of named.slice(0, 1)) await stat(name, page);
  // the counters are published by the shards a few times a second: this read is well past that
  const m1 = await readMetrics();
  const k1 = kernelUdp();

  const d = (k) => (m1[k] ?? 0) - (m0[k] ?? 0);
  const drops = d('unknown_source') + d('malformed');
  const grown = Object.fromEntries(Object.keys(f2).map((n) => [n, f2[n] - f1[n]]));
  log(`flood: after ${afterS} s: framesDecoded ${JSON.stringify(f2)}, grown since the flood ended ` +
    `${Object.entries(grown).map(([n, g]) => `${n} +${g}`).join(', ')}`);
  log(`flood: sluice counted drops +${drops} of ${r.sent} sent (${(100 * drops / r.sent).toFixed(1)} %): ` +
    `unknown_source +${d('unknown_source')}, malformed +${d('malformed')}; ` +
    `datagrams received +${d('datagrams_in')}, rejected by a peer's stack +${d('rtc_rejected')}, ` +
    `peers removed +${d('peers_removed')}; kernel Udp RcvbufErrors +${(k1.RcvbufErrors ?? NaN) - (k0.RcvbufErrors ?? NaN)}, ` +
    `InErrors +${(k1.InErrors ?? NaN) - (k0.InErrors ?? NaN)} (whole host)`);
  console.log(`FLOOD-SUMMARY sent=${r.sent} ports=${ports.join(',')} drops=${drops} ` +
    `unknown_source=${d('unknown_source')} malformed=${d('malformed')} ` +
    Object.entries(grown).map(([n, g]) => `${n}_frames_after=${g}`).join(' '));

  // -- verdict
  const problems = [];
  for (const [name] of named) {
    const states = (lastStats[name]?.states || '').split('>');
    const bad = states.filter((s) => s === 'failed' || s === 'disconnected' || s === 'closed');
    if (bad.length) problems.push(`${name}: connectionState went ${lastStats[name].states}`);
  }
  for (const [n, g] of Object.entries(grown)) {
    if (g < FLOOD.minFrames)
      problems.push(`${n}: framesDecoded grew by ${g} in the ${afterS} s after the flood, expected >= ${FLOOD.minFrames}`);
  }
  if (drops * 2 < r.sent)
    problems.push(`sluice's drop_unknown_source + drop_malformed grew by ${drops}, less than half the ${r.sent} datagrams sent ` +
      `(datagrams received +${d('datagrams_in')}, kernel RcvbufErrors +${(k1.RcvbufErrors ?? NaN) - (k0.RcvbufErrors ?? NaN)})`);
  if (problems.length) throw new Fail(`after a flood of ${r.sent} datagrams: ${problems.join('; ')}`);
  log(`flood: OK: every player decoded >= ${FLOOD.minFrames} frames in the ${afterS} s after the flood, no connection ` +
    `failed or disconnected, sluice counted ${drops} of ${r.sent} datagrams as dropped`);
  return { sent: r.sent, drops, grown };
}

// --------------------------------------------------------------------------- --relay checks

// Once the players decode: every relay-only page's selected candidate pair has a local candidate
// of type 'relay' (to a sluice media port on 127.x), and sluice's TURN counters show the media
// went through it: allocations were made (and are alive), and the relayed packets and bytes grew
// by at least half of what the relay-only pages sent (to_peer) and received (to_client).
async function relayVerdict(pub, players, lastStats, turn0) {
  const named = [['publisher', pub], ...players.map((p, i) => [`player${i + 1}`, p])];
  const problems = [];
  let sentPackets = 0, sentBytes = 0, recvPackets = 0, recvBytes = 0;
  for (const [name, page] of named) {
    const s = (lastStats[name] = await evalOr(page, name, () => window.statsSummary()));
    const sel = s.selected;
    const desc = sel && sel.local
      ? `${sel.local.candidateType} ${sel.local.address}:${sel.local.port}` +
        (sel.local.relayProtocol ? ` (TURN over ${sel.local.relayProtocol}, ${sel.local.url})` : '') +
        ` -> ${sel.remote ? `${sel.remote.candidateType} ${sel.remote.address}:${sel.remote.port}` : '?'}`
      : 'none';
    log(`${name}: selected pair (${sel ? sel.via : '-'}): ${desc}; local candidates ${JSON.stringify(s.localCandidateTypes || {})}` +
      (s.relayCandidates ? `; relay candidates ${s.relayCandidates.join(', ')}` : '') +
      (s.iceErrors ? `; icecandidateerror ${JSON.stringify(s.iceErrors)}` : ''));
    if (!RELAY.has(name)) continue;
    if (!sel || !sel.local) { problems.push(`${name}: no selected candidate pair in getStats`); continue; }
    if (sel.local.candidateType !== 'relay')
      problems.push(`${name}: relay-only, but its selected pair's local candidate is '${sel.local.candidateType}' (${desc})`);
    if (sel.remote && !/^127\./.test(sel.remote.address || ''))
      problems.push(`${name}: selected pair's remote candidate ${sel.remote.address} is not sluice on 127.x`);
    for (const k of ['out_video', 'out_audio']) {
      sentPackets += s[k]?.packetsSent ?? 0;
      sentBytes += s[k]?.bytesSent ?? 0;
    }
    for (const k of ['in_video', 'in_audio']) {
      recvPackets += s[k]?.packetsReceived ?? 0;
      recvBytes += s[k]?.bytesReceived ?? 0;
    }
  }
  const t1 = await readTurnMetrics();
  const d = (k) => t1[k] - turn0[k];
  log(`turn metrics after: ${JSON.stringify(t1)}`);
  log(`turn: allocations alive ${t1.allocations} (+${d('allocations')}), made +${d('allocations_total')}; relayed to_peer ` +
    `+${d('packets_to_peer')} packets / +${d('bytes_to_peer')} bytes (relay-only pages sent ${sentPackets} RTP packets / ` +
    `${sentBytes} bytes), to_client +${d('packets_to_client')} packets / +${d('bytes_to_client')} bytes (they received ` +
    `${recvPackets} RTP packets / ${recvBytes} bytes); refused peers +${d('refused_peers')}, dropped +${d('dropped')}`);
  if (d('allocations_total') < RELAY.size)
    problems.push(`sluice_turn_allocations_total grew by ${d('allocations_total')}, expected >= ${RELAY.size} (one per relay-only page)`);
  if (t1.allocations < RELAY.size)
    problems.push(`sluice_turn_allocations is ${t1.allocations} while ${RELAY.size} relay-only page(s) are connected`);
  if (d('packets_to_peer') * 2 < sentPackets || d('bytes_to_peer') * 2 < sentBytes)
    problems.push(`sluice_turn_relayed_{packets,bytes}_total{direction="to_peer"} grew by ${d('packets_to_peer')} / ` +
      `${d('bytes_to_peer')}, less than half of the ${sentPackets} packets / ${sentBytes} bytes the relay-only pages sent`);
  if (d('packets_to_client') * 2 < recvPackets || d('bytes_to_client') * 2 < recvBytes || d('packets_to_client') === 0)
    problems.push(`sluice_turn_relayed_{packets,bytes}_total{direction="to_client"} grew by ${d('packets_to_client')} / ` +
      `${d('bytes_to_client')}, expected > 0 and >= half of the ${recvPackets} packets / ${recvBytes} bytes the relay-only pages received`);
  if (d('packets_to_peer') === 0) problems.push('sluice relayed nothing to a peer');
  if (problems.length) throw new Fail(`relay: ${problems.join('; ')}`);
  const who = [...RELAY].map(([n, src]) => `${n} (Links from ${lastStats[n]?.relaySource ?? src})`).join(', ');
  const msg = `${who} connected relay-only through sluice's TURN (${d('allocations_total')} allocations; ` +
    `${d('packets_to_peer')} packets / ${(d('bytes_to_peer') / 1e6).toFixed(2)} MB relayed to sluice, ` +
    `${d('packets_to_client')} packets / ${(d('bytes_to_client') / 1e6).toFixed(2)} MB back)`;
  log(`relay: OK: ${msg}`);
  return msg;
}

// --------------------------------------------------------------------------- the test

async function main() {
  const pageSrv = await startPageServer();
  const pageOrigin = `http://127.0.0.1:${pageSrv.address().port}`;
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'sluice-e2e-chromium-'));
  log(`pages served from ${pageOrigin}; sluice at ${BASE}; codec ${CODEC}; profile ${userDataDir}`);

  let context;
  const pages = []; // { name, page }
  const lastStats = {};
  let failure = null;
  let floodResult = null;
  let relayResult = null;
  const warnings = [];
  try {
    try {
      context = await chromium.launchPersistentContext(userDataDir, {
        executablePath: opt.chromium,
        headless: true,
        args: CHROMIUM_FLAGS,
        // playwright mutes audio in headless mode; audio must play for samples to be counted
        ignoreDefaultArgs: ['--mute-audio'],
        timeout: 30000,
      });
    } catch (e) {
      throw new Fail(`cannot launch ${opt.chromium}: ${errText(e)}`);
    }
    const cfg = { base: BASE, stream: opt.stream, codec: CODEC, token: opt.token, retry404Ms: 5000 };

    const newPage = async (name) => {
      const page = pages.length === 0 && context.pages().length ? context.pages()[0] : await context.newPage();
      page.on('console', (m) => { if (opt.verbose || m.type() === 'error') log(`${name} console.${m.type()}: ${m.text()}`); });
      page.on('pageerror', (e) => log(`${name} page error: ${errText(e)}`));
      await page.goto(pageOrigin + '/?' + name);
      pages.push({ name, page });
      return page;
    };

    const cfgFor = (name) => ({ ...cfg, relay: RELAY.get(name) || null, strictOptions: opt['strict-options'] });
    const noteRelay = (name, r) => {
      if (!r.relay) return;
      const o = r.relay.options;
      if (o) log(`${name}: OPTIONS -> ${o.status}, Link: ${o.link ?? '(none readable)'}`);
      if (r.relay.warning) {
        log(`${name}: WARN: ${r.relay.warning}`);
        warnings.push(`${name}: ${r.relay.warning}`);
      }
      log(`${name}: 201 Link: ${r.links201.link ?? '(none readable)'}`);
      const servers = r.relay.source === 'options' ? o.iceServers : r.links201.iceServers;
      log(`${name}: relay-only, iceServers from the ${r.relay.source === 'options' ? 'OPTIONS' : '201'} Links: ` +
        `${JSON.stringify(servers.map((x) => x.urls))}; relay candidates ${r.relay.source === 'options' ? 'offered' : 'gathered'}: ` +
        r.offerCandidates.map((c) => c.replace(/^a=candidate:/, '')).join(' | '));
      if (!r.links201.turn)
        throw new Fail(`${name}: the 201 carries no readable rel="ice-server" turn: Link with credentials (RFC 9725; ` +
          `exposed headers: ${r.links201.exposed})`);
    };
    let turn0 = null;
    if (RELAY.size) {
      turn0 = await readTurnMetrics();
      log(`turn metrics before: ${JSON.stringify(turn0)}`);
    }

    // -- publisher
    const pub = await newPage('publisher');
    const pubRes = await evalOr(pub, 'publisher', (c) => window.whipPublish(c), cfgFor('publisher'));
    log(`publisher: 201 Location ${pubRes.location}; answer ${pubRes.answerMlines.join(', ')}`);
    noteRelay('publisher', pubRes);
    {
      const deadline = Date.now() + 10000;
      for (;;) {
        const s = await evalOr(pub, 'publisher', () => window.statsSummary());
        lastStats.publisher = s;
        if (s.connectionState === 'connected') break;
        if (s.connectionState === 'failed' || Date.now() > deadline)
          throw new Fail(`publisher: peer connection ${s.connectionState} (ICE ${s.iceConnectionState}) after WHIP`);
        await sleep(200);
      }
      log(`publisher: connected via ${lastStats.publisher.pair}`);
    }

    // -- players
    const start = Date.now();
    const players = [];
    for (let i = 1; i <= PLAYERS; i++) players.push(await newPage(`player${i}`));
    await Promise.all(players.map(async (p, i) => {
      const r = await evalOr(p, `player${i + 1}`, (c) => window.whepPlay(c), cfgFor(`player${i + 1}`));
      log(`player${i + 1}: 201 Location ${r.location}; answer ${r.answerMlines.join(', ')}`);
      noteRelay(`player${i + 1}`, r);
    }));

    const ok = (s) => s && s.in_video && s.in_video.framesDecoded > 0 &&
      s.in_audio && s.in_audio.totalSamplesReceived > 0;
    const done = new Set();
    for (;;) {
      for (let i = 0; i < players.length; i++) {
        const name = `player${i + 1}`;
        const s = await evalOr(players[i], name, () => window.statsSummary());
        lastStats[name] = s;
        if (!done.has(name) && ok(s)) {
          done.add(name);
          log(`${name}: framesDecoded ${s.in_video.framesDecoded} (${s.in_video.codec}, ` +
            `${s.in_video.frameWidth}x${s.in_video.frameHeight}), audio totalSamplesReceived ` +
            `${s.in_audio.totalSamplesReceived} after ${((Date.now() - start) / 1000).toFixed(1)} s`);
        }
      }
      lastStats.publisher = await evalOr(pub, 'publisher', () => window.statsSummary());
      if (done.size === players.length) break;
      if (Date.now() - start > TIMEOUT_MS) {
        const why = players.map((_, i) => {
          const n = `player${i + 1}`, s = lastStats[n] || {};
          if (done.has(n)) return null;
          const v = s.in_video || {}, a = s.in_audio || {};
          return `${n}: connection ${s.connectionState}, video framesDecoded ${v.framesDecoded ?? 'n/a'} ` +
            `(packets ${v.packetsReceived ?? 0}, keyframes ${v.keyFramesDecoded ?? 0}, PLIs ${v.pliCount ?? 0}), ` +
            `audio totalSamplesReceived ${a.totalSamplesReceived ?? 'n/a'} (packets ${a.packetsReceived ?? 0})`;
        }).filter(Boolean);
        throw new Fail(`not every player decoded within ${TIMEOUT_MS / 1000} s: ${why.join('; ')}`);
      }
      await sleep(500);
    }
    // the video must be the published codec (sluice forwards, it does not transcode)
    for (const [n, s] of Object.entries(lastStats)) {
      if (!n.startsWith('player')) continue;
      const got = (s.in_video.codec || '').toLowerCase();
      if (got !== 'video/' + CODEC) throw new Fail(`${n}: decoded ${s.in_video.codec}, published video/${CODEC}`);
    }
    if (RELAY.size) relayResult = await relayVerdict(pub, players, lastStats, turn0);
    if (opt.flood) floodResult = await floodPhase(pub, players, lastStats);
  } catch (e) {
    failure = e instanceof Fail ? e.message : `unexpected error: ${e && e.stack ? e.stack : e}`;
  }

  // -- DELETE every Location (players first, then the publisher) and expect 200
  const problems = [];
  for (const { name, page } of [...pages].reverse()) {
    try {
      const r = await page.evaluate((t) => window.deleteSession(t), opt.token);
      if (r.skipped) continue;
      if (r.status !== 200) problems.push(`${name}: DELETE ${r.url} answered ${r.status}, expected 200: ${r.body}`);
      else if (!failure) log(`${name}: DELETE ${r.url} -> 200`);
    } catch (e) {
      problems.push(`${name}: DELETE: ${errText(e)}`);
    }
  }
  if (!failure && problems.length) failure = problems.join('; ');

  console.log('stats: ' + JSON.stringify(lastStats, null, 1).replace(/\n\s*/g, ' '));
  try { if (context) await context.close(); } catch { /* ignore */ }
  pageSrv.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });

  if (failure) {
    console.log(`FAIL: ${failure}`);
    return 1;
  }
  for (const w of warnings) console.log(`WARN: ${w}`);
  console.log(`OK: ${PLAYERS} Chromium players decoded ${CODEC} video and Opus audio via WHIP/WHEP` +
    (relayResult ? `; ${relayResult}` : '') +
    (floodResult ? `, and kept decoding through a flood of ${floodResult.sent} garbage datagrams ` +
      `(frames in the ${FLOOD.afterMs / 1000} s after: ${Object.values(floodResult.grown).join(', ')}; ` +
      `sluice counted ${floodResult.drops} drops)` : ''));
  return 0;
}

const hardStop = setTimeout(() => {
  console.log('FAIL: the whole test took too long (hung?)');
  process.exit(1);
}, TIMEOUT_MS + 90000 + (opt.flood ? FLOOD.ms + FLOOD.afterMs + 30000 : 0));
hardStop.unref();
main().then((code) => process.exit(code), (e) => {
  console.log(`FAIL: unexpected error: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
