// The demo page's Room tab, driven like people would: headless Chromium pages join one room
// through the real page at `/` (fake camera and microphone) and check what they see.
//
//   node tests/e2e/room_page.mjs --url http://127.0.0.1:8080 --room r1 [--mode room|whip] [--screenshot docs/demo-room.png]
//
// room: 3 pages join; each decodes the other two's video and receives their audio; a chat
//   message reaches both others; a mute shows on the others; one leaves and the others see it
//   gone and stop receiving it; a fourth joins late and gets everyone. Malformed and oversized
//   messages and a flood of joins beyond the room's limit are refused while the room works.
// whip: a Publish-tab WHIP publisher is seen by a room participant, and that participant is
//   watched on the Watch tab through WHEP as room~identity.
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
const ROOM = args.room || `room-${Date.now()}`;
const MODE = args.mode || 'room';
const TOKEN = args.token && args.token !== 'true' ? args.token : '';
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
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const log = (m) => console.log(m);

async function until(what, f, ms = 20000) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    last = await f();
    if (last) return last;
    await sleep(250);
  }
  throw new Error(`timed out after ${ms / 1000} s: ${what}`);
}

const userDataDir = mkdtempSync(join(tmpdir(), 'sluice-room-'));
let context;
let failure = null;
const errors = [];

async function open(name) {
  const page = await context.newPage();
  await page.setViewportSize({ width: 1280, height: 860 });
  page.on('pageerror', (e) => errors.push(`${name}: ${e.message}`));
  await page.goto(`${BASE}/#room`);
  if (TOKEN) await page.fill('#token', TOKEN);
  return page;
}

async function joinRoom(name) {
  const page = await open(name);
  await page.fill('#room-name', ROOM);
  await page.fill('#room-display', name);
  await page.click('#room-join');
  await page.waitForFunction(() => room && room.me, null, { timeout: 15000 })
    .catch(async () => { throw new Error(`${name} did not join: ${await page.textContent('#room-err')}`); });
  const me = await page.evaluate(() => room.me);
  log(`${name}: joined as ${me}`);
  return { name, page, me };
}

// Per publisher participant: video frames decoded and audio samples received, from getStats.
async function received(p) {
  return p.page.evaluate(async () => {
    const out = {};
    if (!room || !room.subPc) return out;
    (await room.subPc.getStats()).forEach((r) => {
      if (r.type !== 'inbound-rtp') return;
      const info = room.mids.get(r.mid);
      if (!info) return;
      const o = (out[info.participant] ||= { frames: 0, samples: 0, packets: 0 });
      if (r.kind === 'video') o.frames += r.framesDecoded || 0;
      else o.samples += r.totalSamplesReceived || 0;
      o.packets += r.packetsReceived || 0;
    });
    return out;
  });
}

async function seesEveryone(p, others) {
  const got = await until(`${p.name} decodes video and receives audio of ${others.map((o) => o.name)}`, async () => {
    const r = await received(p);
    return others.every((o) => r[o.me] && r[o.me].frames > 0 && r[o.me].samples > 0) && r;
  });
  const tiles = await p.page.$$eval('.tile', (ts) => ts.map((t) => t.dataset.participant));
  for (const o of others) if (!tiles.includes(o.me)) throw new Error(`${p.name} shows no tile for ${o.name}`);
  log(`${p.name}: ${others.map((o) => `${o.name} frames ${got[o.me].frames} samples ${got[o.me].samples}`).join(', ')}`);
}

async function roomMode() {
  const ann = await joinRoom('Ann');
  const bob = await joinRoom('Bob');
  const cat = await joinRoom('Cat');
  const all = [ann, bob, cat];
  for (const p of all) await seesEveryone(p, all.filter((o) => o !== p));

  // Chat over the data channel.
  await until('chat enabled on Ann', () => ann.page.evaluate(() => !document.querySelector('#chat-input').disabled));
  await ann.page.fill('#chat-input', 'hello from Ann');
  await ann.page.press('#chat-input', 'Enter');
  for (const p of [bob, cat]) {
    await until(`${p.name} sees Ann's chat`, () => p.page.evaluate(() =>
      [...document.querySelectorAll('#chat-log .msg')].some((m) => m.textContent.includes('hello from Ann') && m.textContent.includes('Ann'))));
  }
  log('chat: Ann -> Bob, Cat');

  // Mute: the others show it on Ann's tile.
  await ann.page.click('#room-mute');
  for (const p of [bob, cat]) {
    await until(`${p.name} shows Ann muted`, () => p.page.evaluate((id) =>
      document.querySelector(`.tile[data-participant="${id}"]`)?.classList.contains('muted'), ann.me));
  }
  log('mute: Bob and Cat show Ann muted');

  // Active speaker: the fake microphone beeps, so somebody is highlighted.
  await until('an active speaker is highlighted', () => bob.page.evaluate(() => document.querySelectorAll('.tile.speaking').length === 1));
  log(`speakers: ${await bob.page.evaluate(() => JSON.stringify(room.speakers))}`);

  if (args.screenshot) {
    await sleep(1500);
    await bob.page.screenshot({ path: args.screenshot });
    log(`screenshot: ${args.screenshot}`);
  }

  // Malformed and oversized messages from a fourth socket: errors back, the room carries on.
  const bad = await ann.page.evaluate(async ([roomName, token]) => {
    const ws = new WebSocket(`ws://${location.host}/ws`);
    const seen = [];
    let closed = null;
    ws.onmessage = (e) => seen.push(JSON.parse(e.data));
    ws.onclose = (e) => { closed = e.code; };
    await new Promise((r) => { ws.onopen = r; });
    const join = { type: 'join', room: roomName, name: 'Mallory' };
    if (token) join.token = token;
    ws.send(JSON.stringify(join));
    await new Promise((r) => setTimeout(r, 500));
    ws.send('this is not json');
    ws.send('{"type":"teleport"}');
    ws.send('{"type":"mute","track":12}');
    ws.send(new Uint8Array([1, 2, 3]));
    await new Promise((r) => setTimeout(r, 500));
    const before = closed;
    ws.send(JSON.stringify({ type: 'ping', pad: 'x'.repeat(100000) }));
    await new Promise((r) => setTimeout(r, 1000));
    return { codes: seen.filter((m) => m.type === 'error').map((m) => m.code), before, closed };
  }, [ROOM, TOKEN]);
  log(`bad input: errors ${JSON.stringify(bad.codes)}, closed after garbage ${bad.before}, after oversized ${bad.closed}`);
  for (const c of ['bad_message', 'unknown_type', 'too_large']) if (!bad.codes.includes(c)) throw new Error(`no ${c} error: ${JSON.stringify(bad)}`);
  if (bad.before !== null) throw new Error('garbage closed the socket');
  if (bad.closed !== 4413) throw new Error(`oversized: close code ${bad.closed}, expected 4413`);

  // A flood of joins beyond the room's limit: clean refusals.
  const flood = await ann.page.evaluate(async ([roomName, token]) => {
    // Every socket stays open until all have an answer, so the room really fills up.
    const sockets = [];
    const results = await Promise.all([...Array(60)].map((_, i) => new Promise((resolve) => {
      const ws = new WebSocket(`ws://${location.host}/ws`);
      sockets.push(ws);
      let result = null;
      ws.onopen = () => {
        const join = { type: 'join', room: roomName, name: `flood${i}` };
        if (token) join.token = token;
        ws.send(JSON.stringify(join));
      };
      ws.onmessage = (e) => {
        const m = JSON.parse(e.data);
        if (m.type === 'joined') { result = 'joined'; resolve('joined'); }
        if (m.type === 'error' && !result) result = m.code;
      };
      ws.onclose = (e) => resolve(`${result}/${e.code}`);
      setTimeout(() => resolve(`${result}/timeout`), 20000);
    })));
    for (const ws of sockets) ws.close(1000);
    const count = {};
    for (const r of results) count[r] = (count[r] || 0) + 1;
    return count;
  }, [ROOM, TOKEN]);
  log(`flood of 60 joins: ${JSON.stringify(flood)}`);
  if (!flood['room_full/4503']) throw new Error(`no room_full refusals: ${JSON.stringify(flood)}`);
  const odd = Object.keys(flood).filter((k) => !['room_full/4503', 'joined'].includes(k));
  if (odd.length) throw new Error(`unexpected flood outcomes: ${JSON.stringify(flood)}`);

  // The three are still there and still receiving.
  await sleep(2500);
  for (const p of all) {
    const state = await p.page.evaluate(() => ({ inRoom: !!room, n: room ? room.participants.size : 0 }));
    if (!state.inRoom || state.n !== 3) throw new Error(`${p.name} after the flood: ${JSON.stringify(state)}`);
  }
  const b1 = await received(bob);
  await sleep(1500);
  const b2 = await received(bob);
  if (!(b2[cat.me].frames > b1[cat.me].frames)) throw new Error('Bob stopped decoding Cat after the flood');
  log('after bad input and the flood: the room still works');

  // Ann leaves: the others see her gone and stop receiving her tracks.
  await ann.page.click('#room-leave');
  for (const p of [bob, cat]) {
    await until(`${p.name} sees Ann gone`, () => p.page.evaluate((id) => !document.querySelector(`.tile[data-participant="${id}"]`) && !room.participants.has(id), ann.me));
  }
  await sleep(1500);
  const gone1 = await received(bob);
  await sleep(1500);
  const gone2 = await received(bob);
  const before = gone1[ann.me] ? gone1[ann.me].packets : 0;
  const after = gone2[ann.me] ? gone2[ann.me].packets : 0;
  if (after > before) throw new Error(`Bob still receives Ann after she left (${before} -> ${after} packets)`);
  log(`leave: Bob and Cat see Ann gone; her packets stopped at ${after}`);

  // Dan joins late and gets everyone.
  const dan = await joinRoom('Dan');
  await seesEveryone(dan, [bob, cat]);
  await seesEveryone(bob, [cat, dan]);
  await dan.page.fill('#chat-input', 'late but here');
  await dan.page.press('#chat-input', 'Enter');
  await until('Cat sees Dan\'s chat', () => cat.page.evaluate(() => [...document.querySelectorAll('#chat-log .msg')].some((m) => m.textContent.includes('late but here'))));
  log('late joiner: Dan sees Bob and Cat, and they see him');

  const rooms = await (await fetch(`${BASE}/api/rooms`)).json();
  const mine = rooms.rooms.find((r) => r.room === ROOM);
  if (!mine || mine.participants !== 3) throw new Error(`/api/rooms: ${JSON.stringify(rooms)}`);
  for (const p of [bob, cat, dan]) await p.page.click('#room-leave');
}

async function whipMode() {
  // A WHIP publisher on the Publish tab, in the stream named like the room.
  const pub = await open('whip');
  await pub.click('#tab-publish');
  await pub.fill('#pub-stream', ROOM);
  await pub.click('#pub-start');
  await pub.waitForFunction(() => !document.querySelector('#pub-stop').disabled, null, { timeout: 15000 })
    .catch(async () => { throw new Error(`publish did not start: ${await pub.textContent('#pub-err')}`); });
  log('whip: publishing on the Publish tab');

  const eve = await joinRoom('Eve');
  const whipId = await until('Eve sees the WHIP publisher', () => eve.page.evaluate(() =>
    [...room.participants.values()].find((p) => p.kind === 'whip')?.id));
  const got = await until('Eve decodes the WHIP publisher', async () => {
    const r = await received(eve);
    return r[whipId] && r[whipId].frames > 0 && r[whipId].samples > 0 && r[whipId];
  });
  log(`whip: Eve decodes the WHIP publisher ${whipId}: frames ${got.frames} samples ${got.samples}`);

  // Eve watched through WHEP on the Watch tab, as room~identity.
  const identity = await eve.page.evaluate(() => room.participants.get(room.me).identity);
  const viewer = await open('viewer');
  await viewer.click('#tab-watch');
  await viewer.fill('#watch-stream', `${ROOM}~${identity}`);
  await viewer.click('#watch-start');
  await viewer.waitForFunction(() => !document.querySelector('#watch-stop').disabled, null, { timeout: 15000 })
    .catch(async () => { throw new Error(`watch did not start: ${await viewer.textContent('#watch-err')}`); });
  const frames = await until(`the WHEP viewer of ${ROOM}~${identity} decodes video`, () => viewer.evaluate(async () => {
    let f = 0;
    (await watch.pc.getStats()).forEach((r) => { if (r.type === 'inbound-rtp' && r.kind === 'video') f = r.framesDecoded || 0; });
    return f;
  }));
  log(`whep: ${ROOM}~${identity} decoded ${frames} frames on the Watch tab`);

  // The WHIP publisher stops: Eve sees it leave.
  await pub.click('#pub-stop');
  await until('Eve sees the WHIP publisher leave', () => eve.page.evaluate((id) => !room.participants.has(id), whipId));
  log('whip: stopping the publisher removes it from the room');
  await viewer.click('#watch-stop');
  await eve.page.click('#room-leave');
}

try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: args.chromium || '/usr/bin/chromium',
    headless: true,
    args: FLAGS,
    ignoreDefaultArgs: ['--mute-audio'],
    timeout: 30000,
  });
  if (MODE === 'whip') await whipMode();
  else await roomMode();
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
console.log(`PASS room page (${MODE})`);
