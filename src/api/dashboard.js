// The built-in dashboard: asks /api/v1 (with the token kept in localStorage) and draws what it answers.
// Hosts and process names come from the network, so every text goes in through textContent: nothing here
// builds markup from strings.
'use strict';

const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg';

// Range presets: [seconds, chart interval, bucket seconds]. "All" has no bounds; its chart starts with days
// and coarsens when the history is long.
const RANGES = {
  '1h': [3600, 'minute', 60],
  '24h': [86400, 'hour', 3600],
  '7d': [7 * 86400, 'hour', 3600],
  '30d': [30 * 86400, 'day', 86400],
  all: [0, 'day', 86400],
};
// Top lists: [group_by, key field (also the filter parameter), chip label].
const GROUPS = [
  ['source_ip', 'source_ip', 'device'],
  ['host', 'host', 'host'],
  ['chains', 'node', 'exit node'],
  ['policy', 'policy', 'policy'],
  ['rule', 'rule', 'rule'],
];
const PAGE = 25;
const MAX_BARS = 400;

const state = { range: '24h', filters: {}, search: '', offset: 0 };
let token = localStorage.getItem('mct-token') || '';
let asking = null; // the open token prompt, shared by every request that was refused
let gen = 0; // each refresh bumps it; answers of an older one are dropped
let histGen = 0;
let openBusy = false;

// ---- API ----

// At most two requests at a time, so the browser keeps to one or two connections (each holds a thread of the
// server, which takes a bounded number). Each request also gives up after 20 s, so nothing waits silently.
const MAX_PARALLEL = 2;
let running = 0;
const queued = [];

async function slot() {
  if (running < MAX_PARALLEL) running++;
  else await new Promise((resolve) => queued.push(resolve));
}

function release() {
  const next = queued.shift();
  if (next) next(); // the slot passes on
  else running--;
}

async function get(url, used) {
  await slot();
  try {
    // It refreshes every few seconds and is told of no write: answers up to 4 s old will do (the API's
    // answer cache serves them to every user at once).
    const headers = { 'Cache-Control': 'max-age=4' };
    if (used) headers.Authorization = 'Bearer ' + used;
    const r = await fetch(url, {
      headers,
      cache: 'no-store',
      signal: AbortSignal.timeout(20000),
    });
    let body = null;
    try {
      body = await r.json();
    } catch (e) {
      // not JSON: reported by the caller
    }
    return [r, body];
  } finally {
    release();
  }
}

async function api(path, params) {
  const url = 'api/v1/' + path + '?' + new URLSearchParams(params);
  for (;;) {
    const used = token;
    const [r, body] = await get(url, used);
    if (r.status === 401) {
      // Another request may have brought a new token meanwhile: then just retry with it.
      if (token === used) await askToken(used ? 'That token was refused.' : '');
      continue;
    }
    if (!r.ok || !body || body.status !== 'success') {
      throw new Error((body && body.message) || 'HTTP ' + r.status + ' from ' + path);
    }
    return body;
  }
}

function askToken(msg) {
  if (!asking) {
    asking = new Promise((resolve) => {
      const form = $('login');
      $('login-msg').textContent = msg;
      form.hidden = false;
      $('token').focus();
      form.onsubmit = (e) => {
        e.preventDefault();
        token = $('token').value.trim();
        localStorage.setItem('mct-token', token);
        form.hidden = true;
        asking = null;
        resolve();
      };
    });
  }
  return asking;
}

// ---- formatting ----

function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (i === 0 ? String(n) : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)) + ' ' + units[i];
}

const count = (n) => n.toLocaleString('en-US');
const pad = (n) => String(n).padStart(2, '0');

function when(ms) {
  const d = new Date(ms);
  return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' +
    pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
}

function span(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return s + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' min ' + (s % 60) + ' s';
  if (s < 86400) return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
  return Math.floor(s / 86400) + ' d ' + Math.floor((s % 86400) / 3600) + ' h';
}

// A bucket label: minutes and hours in local time; days, weeks and months are UTC buckets, shown as such.
function bucket(ts, interval) {
  if (interval === 'minute' || interval === 'hour') return when(ts * 1000).slice(5, 16);
  const iso = new Date(ts * 1000).toISOString();
  if (interval === 'month') return iso.slice(0, 7);
  return (interval === 'week' ? 'week of ' : '') + iso.slice(0, 10);
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function headRow(cells) {
  const tr = el('tr');
  for (const [text, cls] of cells) tr.append(el('th', text, cls));
  return tr;
}

function emptyRow(cols, text) {
  const td = el('td', text, 'empty');
  td.colSpan = cols;
  const tr = el('tr');
  tr.append(td);
  return tr;
}

function showError(msg) {
  $('error').textContent = msg || '';
  $('error').hidden = !msg;
}

// ---- state: range, filters, URL ----

function rangeParams() {
  const [secs, , step] = RANGES[state.range];
  if (!secs) return {};
  // Whole buckets, the current one last: the chart has a fixed number of bars.
  const to = Math.floor(Date.now() / 1000 / step) * step + step;
  return { from: to - secs, to };
}

function saveHash() {
  const p = new URLSearchParams(state.filters);
  p.set('range', state.range);
  window.history.replaceState(null, '', '#' + p);
}

function loadHash() {
  const keys = GROUPS.map((g) => g[1]);
  for (const [k, v] of new URLSearchParams(location.hash.slice(1))) {
    if (k === 'range' && RANGES[v]) state.range = v;
    else if (keys.includes(k) && v) state.filters[k] = v;
  }
}

function setFilter(key, value) {
  if (value) state.filters[key] = value;
  else delete state.filters[key];
  state.offset = 0;
  refresh();
}

function drawChips() {
  const chips = GROUPS.filter((g) => state.filters[g[1]] !== undefined).map(([, key, label]) => {
    const b = el('button', label + ': ' + state.filters[key], 'chip');
    b.type = 'button';
    b.title = 'Remove this filter';
    b.onclick = () => setFilter(key, '');
    return b;
  });
  $('chips').replaceChildren(...chips);
}

// ---- drawing ----

function drawTotals(d) {
  const set = (id, text, title) => {
    $(id).textContent = text;
    $(id).title = title;
  };
  set('t-total', bytes(d.total), count(d.total) + ' bytes');
  set('t-down', bytes(d.download), count(d.download) + ' bytes');
  set('t-up', bytes(d.upload), count(d.upload) + ' bytes');
  set('t-count', count(d.count), 'connections opened in the range');
}

function rect(x, y, w, h, cls) {
  const r = document.createElementNS(SVG, 'rect');
  for (const [k, v] of [['x', x], ['y', y], ['width', w], ['height', h]]) r.setAttribute(k, v.toFixed(2));
  r.setAttribute('class', cls);
  return r;
}

// Stacked bars, download below upload; a transparent full-height rect makes even empty buckets hoverable.
function drawChart(down, up, interval) {
  const W = 1000;
  const H = 200;
  const n = down.length;
  const upAt = new Map(up.map((p) => [p.ts, p.value]));
  const max = Math.max(1, ...down.map((p) => p.value + (upAt.get(p.ts) || 0)));
  const w = W / Math.max(n, 1);
  const bw = w > 3 ? w * 0.8 : w;
  const bars = down.map((p, i) => {
    const u = upAt.get(p.ts) || 0;
    const hd = (p.value / max) * H;
    const hu = (u / max) * H;
    const g = document.createElementNS(SVG, 'g');
    g.setAttribute('class', 'bar');
    const title = document.createElementNS(SVG, 'title');
    title.textContent = bucket(p.ts, interval) + '  ↓ ' + bytes(p.value) + '  ↑ ' + bytes(u);
    g.append(title, rect(i * w, 0, w, H, 'hit'), rect(i * w, H - hd, bw, hd, 'd'), rect(i * w, H - hd - hu, bw, hu, 'u'));
    return g;
  });
  $('chart').replaceChildren(...bars);
  $('chart').dataset.points = n;
  $('chart').dataset.total = down.reduce((a, p) => a + p.value + (upAt.get(p.ts) || 0), 0);
  $('chart-note').textContent = n ? 'per ' + interval + ', peak ' + bytes(max === 1 ? 0 : max) : '';
  $('axis-from').textContent = n ? bucket(down[0].ts, interval) : 'no data';
  $('axis-to').textContent = n > 1 ? bucket(down[n - 1].ts, interval) : '';
}

function drawGroup(key, rows) {
  const sum = rows.reduce((a, r) => a + r.total, 0) || 1;
  const out = [headRow([['name'], ['conns', 'num'], ['traffic', 'num']])];
  for (const r of rows) {
    const v = r[key];
    const name = el('td', v === null ? 'everything else' : v === '' ? '(none)' : v, 'key');
    name.title = name.textContent;
    const share = el('span', undefined, 'share');
    share.style.width = ((100 * r.total) / sum).toFixed(1) + '%';
    name.append(share);
    const tr = el('tr');
    tr.append(name, el('td', count(r.count), 'num'), el('td', bytes(r.total), 'num'));
    // Empty and "everything else" rows cannot be filters: an empty parameter means no filter.
    if (v) {
      tr.className = 'pick';
      tr.tabIndex = 0;
      tr.onclick = () => setFilter(key, v);
      tr.onkeydown = (e) => e.key === 'Enter' && setFilter(key, v);
    }
    out.push(tr);
  }
  if (!rows.length) out.push(emptyRow(3, 'nothing in this range'));
  $('g-' + key).replaceChildren(...out);
}

function drawConns(table, rows, open) {
  const now = Date.now();
  const out = [headRow([[open ? 'since' : 'started'], ['host'], ['device'], ['exit node'], ['rule'],
    ['down', 'num'], ['up', 'num'], [open ? 'age' : 'lasted', 'num']])];
  for (const r of rows) {
    const start = Date.parse(r.start);
    const rule = r.rule_payload ? r.rule + ' (' + r.rule_payload + ')' : r.rule;
    const tr = el('tr');
    const host = el('td', (r.host || r.destination_ip) + ':' + r.destination_port, 'key');
    host.title = r.network + ' ' + host.textContent + (r.process ? ' by ' + r.process : '');
    tr.append(el('td', when(start)), host, el('td', r.source_ip), el('td', r.node), el('td', rule),
      el('td', bytes(r.download), 'num'), el('td', bytes(r.upload), 'num'),
      el('td', span((open ? now : Date.parse(r.end)) - start), 'num'));
    out.push(tr);
  }
  if (!rows.length) out.push(emptyRow(8, open ? 'no open connections' : 'no closed connections'));
  table.replaceChildren(...out);
}

// ---- loading ----

async function chart(base, g) {
  let interval = RANGES[state.range][1];
  let down, up;
  for (;;) {
    const p = { type: 'timeseries', interval, fill: 'zero', ...base };
    [down, up] = await Promise.all([
      api('stats', { ...p, metric: 'download' }),
      api('stats', { ...p, metric: 'upload' }),
    ]);
    if (down.data.length <= MAX_BARS || interval === 'month') break;
    interval = interval === 'day' ? 'week' : 'month';
  }
  if (g === gen) drawChart(down.data, up.data, interval);
}

async function group(by, key, base, g) {
  const j = await api('stats', { type: 'group', group_by: by, limit: 10, other: true, ...base });
  if (g === gen) drawGroup(key, j.data);
}

async function loadHistory() {
  const g = ++histGen;
  const p = { state: 'closed', limit: PAGE, offset: state.offset, ...state.filters, ...rangeParams() };
  if (state.search) p.destination = state.search;
  const j = await api('connections', p);
  if (g !== histGen) return;
  drawConns($('hist'), j.data, false);
  const n = j.total_count;
  $('hist-count').textContent = count(n) + ' closed';
  $('page').textContent = n ? state.offset + 1 + '–' + (state.offset + j.data.length) + ' of ' + count(n) : '';
  $('prev').disabled = state.offset === 0;
  $('next').disabled = state.offset + PAGE >= n;
}

async function openNow() {
  if (openBusy) return;
  openBusy = true;
  try {
    const j = await api('connections', { state: 'open', limit: 100, sort_by: 'total', ...state.filters });
    drawConns($('open'), j.data, true);
    const n = j.total_count;
    $('open-count').textContent = n > j.data.length ? j.data.length + ' largest of ' + count(n) : count(n);
  } finally {
    openBusy = false;
  }
}

async function refresh() {
  const g = ++gen;
  saveHash();
  drawChips();
  for (const b of document.querySelectorAll('#ranges button')) {
    b.classList.toggle('on', b.dataset.range === state.range);
  }
  const base = { ...state.filters, ...rangeParams() };
  const jobs = [
    api('stats', { type: 'summary', ...base }).then((j) => g === gen && drawTotals(j.data)),
    chart(base, g),
    ...GROUPS.map(([by, key]) => group(by, key, base, g)),
    loadHistory(),
    openNow(),
  ];
  const failed = (await Promise.allSettled(jobs)).find((r) => r.status === 'rejected');
  if (g !== gen) return;
  showError(failed ? failed.reason.message : '');
  $('updated').textContent = 'Updated ' + when(Date.now());
}

function page(delta) {
  state.offset = Math.max(0, state.offset + delta);
  loadHistory().catch((e) => showError(e.message));
}

function start() {
  loadHash();
  for (const b of document.querySelectorAll('#ranges button')) {
    b.onclick = () => {
      state.range = b.dataset.range;
      state.offset = 0;
      refresh();
    };
  }
  $('prev').onclick = () => page(-PAGE);
  $('next').onclick = () => page(PAGE);
  let typing = 0;
  $('search').oninput = () => {
    clearTimeout(typing);
    typing = setTimeout(() => {
      state.search = $('search').value.trim();
      state.offset = 0;
      loadHistory().catch((e) => showError(e.message));
    }, 300);
  };
  // Open connections live; the rest once a minute. Nothing while hidden or while the token is asked.
  setInterval(() => {
    if (!document.hidden && !asking) openNow().catch((e) => showError(e.message));
  }, 5000);
  setInterval(() => {
    if (!document.hidden && !asking) refresh();
  }, 60000);
  refresh();
}

start();
