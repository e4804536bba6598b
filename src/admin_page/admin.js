// The admin page: signs in, then follows /api/admin/events (one snapshot a
// second) and updates the tables in place, row by row, keyed by id. The
// token stays in sessionStorage (this tab only); actions are POSTs to the
// admin API.
'use strict';

const $ = (sel) => document.querySelector(sel);
let token = sessionStorage.getItem('agentgate-admin-token');
// Per run: recent (time, seq) samples for its events-per-second chart.
const history = new Map();
const CHART_POINTS = 30;

function api(path, options = {}) {
  return fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json', ...(options.headers || {}) },
  });
}

function showLogin(message) {
  $('#app').hidden = true;
  $('#login').hidden = false;
  const refused = $('#refused');
  refused.hidden = !message;
  refused.textContent = message || '';
}

$('#login').addEventListener('submit', async (e) => {
  e.preventDefault();
  const form = new FormData(e.target);
  const res = await fetch('/api/auth/login', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ username: form.get('username'), password: form.get('password') }),
  });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) return showLogin(body?.error?.message || `Sign-in failed (${res.status})`);
  token = body.token;
  sessionStorage.setItem('agentgate-admin-token', token);
  start();
});

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text ?? '-';
  if (cls) td.className = cls;
  return td;
}

function button(label, onClick, plain) {
  const td = document.createElement('td');
  const b = document.createElement('button');
  b.textContent = label;
  if (plain) b.className = 'plain';
  b.addEventListener('click', onClick);
  td.appendChild(b);
  return td;
}

// Replaces the table body's rows, keeping each row element (and its chart)
// by key so the page updates in place.
function fill(id, items, key, render) {
  const body = $(`#${id} tbody`);
  const old = new Map([...body.querySelectorAll('tr[data-key]')].map((tr) => [tr.dataset.key, tr]));
  body.querySelectorAll('tr:not([data-key])').forEach((tr) => tr.remove());
  const keep = new Set();
  for (const item of items) {
    const k = String(key(item));
    keep.add(k);
    let tr = old.get(k);
    if (!tr) {
      tr = document.createElement('tr');
      tr.dataset.key = k;
    }
    // In the snapshot's order (moving a row keeps its chart).
    body.appendChild(tr);
    render(tr, item);
  }
  for (const [k, tr] of old) if (!keep.has(k)) tr.remove();
  if (!items.length) {
    const tr = document.createElement('tr');
    const td = cell('none', 'empty');
    td.colSpan = $(`#${id} thead tr`).children.length;
    tr.appendChild(td);
    body.appendChild(tr);
  }
}

function setCells(tr, cells) {
  const chart = tr.querySelector('canvas');
  tr.replaceChildren(...cells);
  if (chart) {
    const slot = tr.querySelector('td.chart');
    if (slot) slot.replaceChildren(chart);
  }
}

async function act(path, what) {
  const res = await api(path, { method: 'POST', body: '{}' });
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    $('#error').hidden = false;
    $('#error').textContent = `${what}: ${body?.error?.message || res.status}`;
  }
}

function rate(runId, seq) {
  const now = Date.now() / 1000;
  const h = history.get(runId) || [];
  h.push([now, seq]);
  while (h.length > CHART_POINTS + 1) h.shift();
  history.set(runId, h);
  const rates = [];
  for (let i = 1; i < h.length; i++) {
    const dt = h[i][0] - h[i - 1][0];
    rates.push(dt > 0 ? (h[i][1] - h[i - 1][1]) / dt : 0);
  }
  return rates;
}

function draw(canvas, rates) {
  const ctx = canvas.getContext('2d');
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const max = Math.max(1, ...rates);
  ctx.strokeStyle = '#2a62c9';
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  rates.forEach((r, i) => {
    const x = (i / Math.max(1, CHART_POINTS - 1)) * width;
    const y = height - 2 - (r / max) * (height - 4);
    if (i === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

function render(snap) {
  const c = snap.connections || {};
  $('#conns').textContent = 'open connections: ' + Object.entries(c).map(([k, v]) => `${k} ${v}`).join(' · ');
  fill('runs', snap.runs || [], (r) => r.runId, (tr, r) => {
    const rates = rate(r.runId, r.lastSeq);
    const last = rates.length ? rates[rates.length - 1] : 0;
    const chartCell = cell('', 'chart');
    const state = r.state + (r.paused ? ' (paused)' : '') + (r.aborted ? ' (aborted)' : '');
    const cells = [
      cell(r.sessionId), cell(r.user), cell(r.provider),
      cell(state, `state-${r.state}${r.paused ? ' paused' : ''}`),
      cell(r.lastSeq, 'seq'), chartCell, cell(r.subscribers), cell(r.pendingPermissions), cell(`${r.ageSecs}s`),
      r.state === 'running'
        ? button('Abort', () => act(`/api/admin/runs/${encodeURIComponent(r.sessionId)}/abort`, 'abort'))
        : cell(''),
    ];
    setCells(tr, cells);
    let canvas = tr.querySelector('canvas');
    if (!canvas) {
      canvas = document.createElement('canvas');
      canvas.className = 'spark';
      canvas.width = 120;
      canvas.height = 24;
      tr.querySelector('td.chart').replaceChildren(canvas);
    }
    canvas.title = `${last.toFixed(1)} events/s`;
    canvas.dataset.rate = last.toFixed(1);
    draw(canvas, rates);
  });
  fill('sockets', snap.sockets || [], (s) => s.id, (tr, s) => setCells(tr, [
    cell(s.id), cell(s.user), cell(s.sessions), cell(s.queuedBytes), cell(s.queuedDeliveries),
    button('Disconnect', () => act(`/api/admin/sockets/${s.id}/disconnect`, 'disconnect')),
  ]));
  fill('ptys', snap.ptys || [], (p) => p.id, (tr, p) => setCells(tr, [
    cell(p.id), cell(p.user), cell(p.pid), cell(p.sockets ? `${p.sockets} attached` : 'detached'),
    cell(`${p.ageSecs}s`), cell(p.command),
    button('Kill', () => act(`/api/admin/ptys/${p.id}/kill`, 'kill')),
  ]));
  fill('plugins', snap.plugins || [], (p) => p.name, (tr, p) => {
    const actions = document.createElement('td');
    for (const [label, verb] of [['Restart', 'restart'], ['Stop', 'stop']]) {
      const b = document.createElement('button');
      b.textContent = label;
      b.className = 'plain';
      b.addEventListener('click', () => act(`/api/admin/plugins/${encodeURIComponent(p.name)}/${verb}`, verb));
      actions.appendChild(b);
      actions.append(' ');
    }
    setCells(tr, [cell(p.name), cell(p.state, `state-${p.state}`), cell(p.pid), cell(p.restarts, 'restarts'), cell(p.lastError), actions]);
  });
  const events = (snap.supervision || []).slice().reverse();
  fill('supervision', events, (e) => `${e.timestamp}|${e.event}|${e.actor}|${e.ids || e.run_id || e.socket || e.pty || e.plugin || ''}`, (tr, e) => {
    const { timestamp, level, event, actor, message, ...rest } = e;
    const details = Object.entries(rest).map(([k, v]) => `${k}=${v}`).join(' ');
    setCells(tr, [cell((timestamp || '').slice(11, 19)), cell(level, `lvl-${level}`), cell(event), cell(actor), cell(details)]);
  });
}

// Server-sent events read through fetch, so the token goes in a header,
// never in a URL.
async function follow() {
  for (;;) {
    try {
      const res = await api('/api/admin/events');
      if (res.status === 401) return showLogin('Signed out; sign in again');
      if (res.status === 403) return showLogin('This user is not an admin');
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const chunk = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = chunk.split('\n').filter((l) => l.startsWith('data: ')).map((l) => l.slice(6)).join('\n');
          if (chunk.startsWith('event: snapshot') && data) {
            $('#error').hidden = true;
            render(JSON.parse(data));
          }
        }
      }
    } catch (e) {
      $('#error').hidden = false;
      $('#error').textContent = `Connection lost (${e}); retrying`;
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

async function start() {
  const res = await api('/api/admin/snapshot');
  if (res.status === 401) return showLogin();
  if (res.status === 403) return showLogin('This user is not an admin');
  $('#login').hidden = true;
  $('#app').hidden = false;
  render((await res.json()).data);
  follow();
}

if (token) start();
else showLogin();
