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
// Exit 0 on success; 1 with one line 'FAIL: <reason>' on stdout otherwise. The stats seen are
// printed either way. Only loopback addresses are used.

import { chromium } from 'playwright-core';
import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';

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
    help: { type: 'boolean', default: false },
  },
});
if (opt.help || !opt.url || !opt.stream) {
  console.log('usage: chromium_whip_whep.mjs --url http://127.0.0.1:PORT --stream NAME [--codec vp8|h264]\n' +
    '         [--players 2] [--timeout 20] [--token JWT] [--chromium /usr/bin/chromium] [--verbose]');
  process.exit(opt.help ? 0 : 1);
}
const BASE = opt.url.replace(/\/+$/, '');
const CODEC = opt.codec.toLowerCase();
const PLAYERS = Number(opt.players);
const TIMEOUT_MS = Number(opt.timeout) * 1000;
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
];

// --------------------------------------------------------------------------- the page's code
// Runs inside Chromium. Kept plain (no build step) and served as /client.js.
const CLIENT_JS = String.raw`
const ORIGIN_NOTE = 'fetch failed: connection refused, or the CORS preflight was not answered ' +
  'with Access-Control-Allow-Origin for ' + location.origin;

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

async function negotiate(pc, endpoint, cfg, retry404Ms) {
  await pc.setLocalDescription();
  await waitGathering(pc, 10000);
  // Offer only the 127.x UDP candidates: this machine's other interfaces (and IPv6) are no target
  // of these tests, and sluice then sees exactly what a loopback-only deployment sees.
  const all = pc.localDescription.sdp;
  const offer = all.split('\r\n').filter(l => !l.startsWith('a=candidate:') ||
    /^a=candidate:\S+ \d+ udp \d+ 127\.\d+\.\d+\.\d+ \d+ typ host/i.test(l)).join('\r\n');
  if (!/^a=candidate:.* 127\.0\.0\.1 /m.test(offer))
    throw new Error('the offer has no 127.0.0.1 candidate (is --allow-loopback-in-peer-connection on?): ' +
      (all.match(/^a=candidate:.*$/mg) || []).join(' | '));
  const url = cfg.base + '/' + endpoint + '/' + encodeURIComponent(cfg.stream);
  const giveUp = Date.now() + retry404Ms;
  let resp;
  for (;;) {
    try {
      resp = await fetch(url, { method: 'POST', body: offer, headers:
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
  try {
    await pc.setRemoteDescription({ type: 'answer', sdp: body });
  } catch (e) {
    throw new Error('Chromium rejected the SDP answer: ' + e);
  }
  return { location: window.__location, answerMlines: (body.match(/^m=.*$/mg) || []) };
}

window.whipPublish = async (cfg) => {
  let ms;
  try {
    ms = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480, frameRate: 30 }, audio: true });
  } catch (e) { throw new Error('getUserMedia failed: ' + e); }
  const pc = new RTCPeerConnection({ iceServers: [], bundlePolicy: 'max-bundle' });
  window.__pc = pc;
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
  const pc = new RTCPeerConnection({ iceServers: [], bundlePolicy: 'max-bundle' });
  window.__pc = pc;
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
    }
  });
  const v = document.getElementById('remote-video');
  if (v) out.videoElement = { w: v.videoWidth, h: v.videoHeight, paused: v.paused };
  const au = document.getElementById('remote-audio');
  if (au) out.audioElement = { paused: au.paused };
  if (window.__playErrors) out.playErrors = window.__playErrors;
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

    // -- publisher
    const pub = await newPage('publisher');
    const pubRes = await evalOr(pub, 'publisher', (c) => window.whipPublish(c), cfg);
    log(`publisher: 201 Location ${pubRes.location}; answer ${pubRes.answerMlines.join(', ')}`);
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
      const r = await evalOr(p, `player${i + 1}`, (c) => window.whepPlay(c), cfg);
      log(`player${i + 1}: 201 Location ${r.location}; answer ${r.answerMlines.join(', ')}`);
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
  console.log(`OK: ${PLAYERS} Chromium players decoded ${CODEC} video and Opus audio via WHIP/WHEP`);
  return 0;
}

const hardStop = setTimeout(() => {
  console.log('FAIL: the whole test took too long (hung?)');
  process.exit(1);
}, TIMEOUT_MS + 90000);
hardStop.unref();
main().then((code) => process.exit(code), (e) => {
  console.log(`FAIL: unexpected error: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
