#!/usr/bin/env node
// Simulcast with real headless Chromium (playwright-core) against a running sluice.
//
//   node tests/e2e/chromium_simulcast.mjs --url http://127.0.0.1:8080 --stream s1 --mode caps
//   node tests/e2e/chromium_simulcast.mjs --url http://10.251.7.1:8080 --stream s1 --mode limited \
//        --page-host 10.251.7.1 --prefixes 10.251.7. --viewer-chromium /tmp/chromium-in-netns \
//        --lift-cmd 'tc qdisc del dev sc0 root'
//
// The publisher page sends its fake camera at 1280x720 as three VP8 simulcast layers over WHIP
// (sendEncodings rids q, h, f at scaleResolutionDownBy 4, 2, 1), and waits until Chromium sends
// the top layer at 1280 wide.
//
// --mode caps: an uncapped WHEP viewer must decode frameWidth 1280 within --timeout s, and a
// viewer with ?max_height=360 must decode and never show a frame wider than 640.
//
// --mode limited: one WHEP viewer runs in the browser given by --viewer-chromium (a wrapper that
// starts Chromium inside a network namespace whose downlink the caller limited, e.g. tc tbf
// 600kbit). It must settle on a layer at most 640 wide and keep decoding (framesDecoded grows by
// at least 10 per second over --settle-check s and by 5 in the second after it, freezeCount
// grows by at most 3), then, once
// --lift-cmd has run, decode frameWidth 1280 within 15 s.
//
// Offers keep only host candidates whose address starts with one of --prefixes (default 127.).
// Exit 0 on success; 1 with one line 'FAIL: <reason>' otherwise. Only the addresses given are used.

import { chromium } from 'playwright-core';
import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execSync } from 'node:child_process';
import { parseArgs } from 'node:util';

const T0 = Date.now();
const log = (m) => console.log(`[${((Date.now() - T0) / 1000).toFixed(2).padStart(6)}s] ${m}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
class Fail extends Error {}

const { values: opt } = parseArgs({
  options: {
    url: { type: 'string' },
    stream: { type: 'string' },
    mode: { type: 'string', default: 'caps' },
    timeout: { type: 'string', default: '45' },
    'page-host': { type: 'string', default: '127.0.0.1' },
    prefixes: { type: 'string', default: '127.' },
    chromium: { type: 'string', default: process.env.CHROMIUM || '/usr/bin/chromium' },
    'viewer-chromium': { type: 'string', default: '' },
    'lift-cmd': { type: 'string', default: '' },
    'settle-check': { type: 'string', default: '6' },
    token: { type: 'string', default: '' },
  },
});
if (!opt.url || !opt.stream || !['caps', 'limited'].includes(opt.mode) ||
    (opt.mode === 'limited' && (!opt['viewer-chromium'] || !opt['lift-cmd']))) {
  console.log('usage: chromium_simulcast.mjs --url URL --stream NAME [--mode caps|limited] [--timeout 45]\n' +
    '         [--page-host 127.0.0.1] [--prefixes 127.,10.1.] [--chromium PATH]\n' +
    '         [--viewer-chromium WRAPPER --lift-cmd CMD [--settle-check 6]]   (limited)');
  process.exit(1);
}
const BASE = opt.url.replace(/\/+$/, '');
const PREFIXES = opt.prefixes.split(',').map((p) => p.trim()).filter(Boolean);
const TIMEOUT_MS = Number(opt.timeout) * 1000;

const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
  '--allow-loopback-in-peer-connection', '--autoplay-policy=no-user-gesture-required',
  '--no-proxy-server',
  ...(process.env.E2E_CHROMIUM_EXTRA_FLAGS || '').split(/\s+/).filter(Boolean),
];

// The page's code (served as /client.js).
const CLIENT_JS = String.raw`
const gather = (pc) => new Promise((resolve) => {
  if (pc.iceGatheringState === 'complete') return resolve();
  const t = setTimeout(resolve, 3000);
  pc.addEventListener('icegatheringstatechange', () => {
    if (pc.iceGatheringState === 'complete') { clearTimeout(t); resolve(); }
  });
});
const keep = (sdp, prefixes) => sdp.split('\r\n').filter((l) => !l.startsWith('a=candidate:') ||
  (l.split(' ')[7] === 'host' && prefixes.some((p) => l.split(' ')[4].startsWith(p)))).join('\r\n');
async function post(url, sdp, token) {
  const headers = { 'Content-Type': 'application/sdp' };
  if (token) headers.Authorization = 'Bearer ' + token;
  const r = await fetch(url, { method: 'POST', headers, body: sdp });
  const text = await r.text();
  if (r.status !== 201) throw new Error('POST ' + url + ' -> ' + r.status + ': ' + text);
  return text;
}
window.publish = async ({ base, stream, prefixes, token }) => {
  const media = await navigator.mediaDevices.getUserMedia({ video: { width: 1280, height: 720, frameRate: 30 } });
  const pc = new RTCPeerConnection();
  window.pc = pc;
  const tr = pc.addTransceiver(media.getVideoTracks()[0], { direction: 'sendonly', sendEncodings: [
    { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 200000 },
    { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 600000 },
    { rid: 'f', scaleResolutionDownBy: 1, maxBitrate: 1800000 },
  ] });
  tr.setCodecPreferences(RTCRtpReceiver.getCapabilities('video').codecs.filter((c) => c.mimeType === 'video/VP8'));
  const p = tr.sender.getParameters();
  p.degradationPreference = 'maintain-resolution';
  await tr.sender.setParameters(p).catch(() => {});
  await pc.setLocalDescription();
  await gather(pc);
  const answer = await post(base + '/whip/' + stream, keep(pc.localDescription.sdp, prefixes), token);
  await pc.setRemoteDescription({ type: 'answer', sdp: answer });
  return answer.split('\r\n').filter((l) => l.startsWith('a=simulcast') || l.startsWith('a=rid')).join(' | ');
};
window.play = async ({ base, stream, query, prefixes, token }) => {
  const pc = new RTCPeerConnection();
  window.pc = pc;
  pc.addTransceiver('video', { direction: 'recvonly' });
  const v = document.createElement('video');
  v.autoplay = true; v.muted = true;
  document.body.appendChild(v);
  pc.ontrack = (e) => { v.srcObject = new MediaStream([e.track]); };
  await pc.setLocalDescription();
  await gather(pc);
  const answer = await post(base + '/whep/' + stream + query, keep(pc.localDescription.sdp, prefixes), token);
  await pc.setRemoteDescription({ type: 'answer', sdp: answer });
};
// The video inbound-rtp that decodes (padding and probes may show up as another, with SSRC 0).
window.inbound = async () => {
  let best = { w: 0, h: 0, decoded: 0, freezes: 0, kbytes: 0 };
  for (const r of (await window.pc.getStats()).values()) {
    if (r.type === 'inbound-rtp' && r.kind === 'video' && (r.framesDecoded || 0) >= best.decoded) {
      best = { w: r.frameWidth || 0, h: r.frameHeight || 0, decoded: r.framesDecoded || 0,
        freezes: r.freezeCount || 0, kbytes: Math.round((r.bytesReceived || 0) / 1000) };
    }
  }
  return best;
};
window.dump = async () => {
  const out = [];
  for (const r of (await window.pc.getStats()).values()) {
    if (['inbound-rtp', 'transport', 'candidate-pair', 'codec'].includes(r.type) && (r.type !== 'candidate-pair' || r.nominated))
      out.push(r.type + ' ' + JSON.stringify(Object.fromEntries(Object.entries(r).filter(([k]) =>
        /packets|bytes|frame|state|mimeType|payloadType|ssrc|nack|pli|fir|discard|lost|jitter/i.test(k)))));
  }
  return out.join('\n');
};
window.outbound = async () => {
  const o = {};
  for (const r of (await window.pc.getStats()).values()) {
    if (r.type === 'outbound-rtp' && r.kind === 'video') {
      o[r.rid] = { w: r.frameWidth || 0, fps: r.framesPerSecond || 0, limit: r.qualityLimitationReason, sent: r.framesEncoded || 0 };
    }
  }
  return o;
};
`;

function startPageServer(host) {
  return new Promise((resolve, reject) => {
    const srv = http.createServer((req, res) => {
      if (req.url === '/client.js') {
        res.writeHead(200, { 'Content-Type': 'text/javascript' });
        res.end(CLIENT_JS);
      } else if (req.url === '/' || req.url.startsWith('/?')) {
        res.writeHead(200, { 'Content-Type': 'text/html' });
        res.end('<!doctype html><meta charset="utf-8"><title>sluice simulcast e2e</title><script src="/client.js"></script>');
      } else {
        res.writeHead(404);
        res.end();
      }
    });
    srv.on('error', reject);
    srv.listen(0, host, () => resolve(srv));
  });
}

// A page served from an address other than loopback is no secure context, so it would have no
// getUserMedia: Chromium is told to treat this test's own origin as secure.
async function launch(executablePath, origin) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sluice-e2e-simulcast-'));
  const args = [...FLAGS, `--unsafely-treat-insecure-origin-as-secure=${origin}`];
  try {
    return await chromium.launchPersistentContext(dir, { executablePath, headless: true, args, timeout: 30000 });
  } catch (e) {
    throw new Fail(`cannot launch ${executablePath}: ${String(e.message || e).split('\n')[0]}`);
  }
}

async function openPage(context, origin, name) {
  const page = await context.newPage();
  page.on('pageerror', (e) => log(`${name} page error: ${e.message}`));
  await page.goto(`${origin}/?${name}`);
  return page;
}

async function call(page, name, fn, arg) {
  try {
    return await page.evaluate(([f, a]) => window[f](a), [fn, arg]);
  } catch (e) {
    throw new Fail(`${name}: ${String(e.message || e).split('\n')[0]}`);
  }
}

// Poll `probe` every 500 ms until `ok(value)` or the deadline; returns the last value and whether ok.
async function until(ms, probe, ok, show) {
  const end = Date.now() + ms;
  let last;
  let n = 0;
  while (Date.now() < end) {
    last = await probe();
    if (show && n++ % 4 === 0) await show(last);
    if (ok(last)) return { value: last, ok: true };
    await sleep(500);
  }
  return { value: last, ok: false };
}

async function main() {
  const pageSrv = await startPageServer(opt['page-host']);
  const origin = `http://${opt['page-host']}:${pageSrv.address().port}`;
  const args = { base: BASE, stream: opt.stream, prefixes: PREFIXES, token: opt.token };
  const contexts = [];
  try {
    const host = await launch(opt.chromium, origin);
    contexts.push(host);
    const pub = await openPage(host, origin, 'publisher');
    const sim = await call(pub, 'publisher', 'publish', args);
    log(`publisher: WHIP 201; answer ${sim}`);
    const top = await until(TIMEOUT_MS, () => pub.evaluate(() => window.outbound()),
      (o) => o.f && o.f.w >= 1280, (o) => log(`publisher layers ${JSON.stringify(o)}`));
    if (!top.ok) throw new Fail(`Chromium never sent the 1280-wide layer: ${JSON.stringify(top.value)}`);
    log(`publisher sends all layers: ${JSON.stringify(top.value)}`);

    if (opt.mode === 'caps') {
      const full = await openPage(host, origin, 'uncapped');
      await call(full, 'uncapped', 'play', { ...args, query: '' });
      const small = await openPage(host, origin, 'max_height_360');
      await call(small, 'max_height=360', 'play', { ...args, query: '?max_height=360' });
      let widest = 0;
      const r = await until(TIMEOUT_MS, async () => {
        const [a, b] = [await full.evaluate(() => window.inbound()), await small.evaluate(() => window.inbound())];
        widest = Math.max(widest, b.w);
        return { a, b };
      }, ({ a, b }) => a.w === 1280 && a.decoded > 0 && b.decoded > 30,
      ({ a, b }) => log(`uncapped ${JSON.stringify(a)}  max_height=360 ${JSON.stringify(b)}`));
      log(`uncapped ${JSON.stringify(r.value.a)}  max_height=360 ${JSON.stringify(r.value.b)}`);
      if (!(r.value.a.w === 1280 && r.value.a.decoded > 0)) {
        log(`uncapped viewer stats:\n${await full.evaluate(() => window.dump())}`);
      }
      if (!(r.value.a.w === 1280 && r.value.a.decoded > 0))
        throw new Fail(`the uncapped viewer did not decode the top layer: ${JSON.stringify(r.value.a)}`);
      if (!(r.value.b.decoded > 30)) throw new Fail(`the max_height=360 viewer decoded too little: ${JSON.stringify(r.value.b)}`);
      for (let i = 0; i < 6; i++) {
        widest = Math.max(widest, (await small.evaluate(() => window.inbound())).w);
        await sleep(500);
      }
      if (widest > 640) throw new Fail(`the max_height=360 viewer decoded frames ${widest} wide`);
      log(`PASS: uncapped decodes 1280 wide; max_height=360 decodes at most ${widest} wide`);
      return;
    }

    // --mode limited
    const ns = await launch(opt['viewer-chromium'], origin);
    contexts.push(ns);
    const v = await openPage(ns, origin, 'limited');
    await call(v, 'limited viewer', 'play', { ...args, query: '' });
    const stats = () => v.evaluate(() => window.inbound());
    // Settled: decoding, at most 640 wide, for --settle-check s in a row.
    const checkMs = Number(opt['settle-check']) * 1000;
    let since = null;
    let start = null;
    const settled = await until(TIMEOUT_MS, stats, (s) => {
      if (s.decoded > 0 && s.w > 0 && s.w <= 640) {
        if (!since) { since = Date.now(); start = s; }
        return Date.now() - since >= checkMs;
      }
      since = null;
      return false;
    }, async (s) => log(`limited viewer ${JSON.stringify(s)}; publisher ${JSON.stringify(await pub.evaluate(() => window.outbound()))}`));
    if (!settled.ok) {
      log(`limited viewer stats:\n${await v.evaluate(() => window.dump())}`);
      throw new Fail(`the limited viewer did not settle on a layer <= 640 wide: ${JSON.stringify(settled.value)}`);
    }
    const s = settled.value;
    const fps = (s.decoded - start.decoded) / (checkMs / 1000);
    log(`settled: ${JSON.stringify(s)}; ${fps.toFixed(1)} frames/s, ${s.freezes - start.freezes} freezes over ${checkMs / 1000} s`);
    if (fps < 10) {
      log(`limited viewer stats:\n${await v.evaluate(() => window.dump())}`);
      throw new Fail(`the limited viewer decodes only ${fps.toFixed(1)} frames/s on the low layer`);
    }
    if (s.freezes - start.freezes > 3) throw new Fail(`the limited viewer froze ${s.freezes - start.freezes} times`);
    // The average above could hide a stream that stopped at the end of the window.
    await sleep(1000);
    const after = await stats();
    if (after.decoded - s.decoded < 5) {
      log(`limited viewer stats:\n${await v.evaluate(() => window.dump())}`);
      throw new Fail(`the limited viewer stopped decoding under the limit: ${JSON.stringify(after)} 1 s after ${JSON.stringify(s)}`);
    }
    log(`lifting the limit: ${opt['lift-cmd']}`);
    execSync(opt['lift-cmd'], { stdio: 'inherit' });
    const t = Date.now();
    const back = await until(15000, stats, (x) => x.w === 1280, (x) => log(`limited viewer ${JSON.stringify(x)}`));
    if (!back.ok) {
      log(`limited viewer stats:\n${await v.evaluate(() => window.dump())}`);
      throw new Fail(`no top layer within 15 s of lifting the limit: ${JSON.stringify(back.value)}`);
    }
    log(`PASS: settled at ${s.w}x${s.h} under the limit; back to 1280 wide ${((Date.now() - t) / 1000).toFixed(1)} s after lifting it`);
  } finally {
    for (const c of contexts) await c.close().catch(() => {});
    pageSrv.close();
  }
}

const hardStop = setTimeout(() => { console.log('FAIL: hard timeout'); process.exit(1); }, TIMEOUT_MS * 3 + 60000);
main().then(() => { clearTimeout(hardStop); process.exit(0); }).catch((e) => {
  clearTimeout(hardStop);
  console.log(`FAIL: ${e instanceof Fail ? e.message : (e.stack || e)}`);
  process.exit(1);
});
