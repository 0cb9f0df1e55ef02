// Live telemetry: subscribes to a websocket downstream on the same host (the session cookie
// authenticates the socket), with optional listener / device filters. Keeps the last 200
// messages, can pause, and draws the message rate of the last minute.

import { api } from './api.js';
import {
  badge, button, emptyState, errorState, formatTime, h, linkButton, loadingState, pageHeader, prettyJson, replace, toast, uid,
} from './dom.js';

const BUFFER = 200;
const RATE_WINDOW = 60; // seconds shown by the sparkline

export async function screen(main, params, ctx) {
  main.append(pageHeader('Live telemetry', {
    lead: 'Messages as they are routed to a WebSocket downstream. Nothing here slows devices down: a viewer that falls behind skips messages. With several nodes, this view shows every node\'s messages only when the nodes share a bus (--bus-url); without one, only those of the node serving this page.',
  }));
  const body = h('div', {}, loadingState('Loading downstreams…'));
  main.append(body);

  const load = async () => {
    try {
      const [downstreams, listeners, routes] = await Promise.all([api.get('/downstreams'), api.get('/listeners'), api.get('/routes')]);
      if (ctx.signal.aborted) return;
      const feeds = downstreams.filter((d) => d.type === 'websocket');
      if (feeds.length === 0) {
        body.replaceChildren(noFeed(load));
        return;
      }
      body.replaceChildren(viewer(feeds, listeners, routes, ctx));
    } catch (error) {
      if (!ctx.signal.aborted) body.replaceChildren(errorState(error, load));
    }
  };
  await load();
}

function noFeed(reload) {
  const create = button('Create downstream “live” at /live', async () => {
    create.disabled = true;
    try {
      await api.post('/downstreams', { key: 'live', name: 'Live view', type: 'websocket', path: '/live', format: 'envelope' });
      toast('Created the downstream live at /live.');
      reload();
    } catch (error) {
      toast(error.message, 'error');
      create.disabled = false;
    }
  }, { kind: 'primary' });
  return emptyState('No live feed yet',
    'The live view subscribes to a WebSocket downstream. Create one, then add a route that delivers messages to it.',
    [create, linkButton('Configure one yourself', '#/downstreams/new')]);
}

function viewer(feeds, listeners, routes, ctx) {
  const ids = { feed: uid('feed'), listener: uid('listener'), device: uid('device') };
  const feedSelect = h('select', { id: ids.feed, class: 'input' },
    feeds.map((f) => h('option', { value: f.key }, `${f.name} (${f.path})`)));
  const preferred = feeds.find((f) => f.key === 'live') ?? feeds[0];
  feedSelect.value = preferred.key;
  const listenerSelect = h('select', { id: ids.listener, class: 'input' },
    h('option', { value: '' }, 'All listeners'),
    listeners.map((l) => h('option', { value: l.key }, `${l.name} (${l.key})`)));
  const deviceInput = h('input', { id: ids.device, class: 'input mono', type: 'text', placeholder: 'Any device', autocomplete: 'off', spellcheck: 'false' });

  const statusPill = badge('connecting', 'warn');
  const pauseButton = button('Pause', () => togglePause());
  const clearButton = button('Clear', () => clearMessages());
  const counter = h('span', { class: 'muted small' });
  const rateText = h('span', { class: 'rate-now' }, '0');
  const canvas = h('canvas', { class: 'sparkline', width: 240, height: 48, role: 'img', 'aria-label': 'Messages per second over the last minute' });
  const routeWarning = h('div', {});
  const list = h('ol', { class: 'messages', 'aria-live': 'off' });
  const empty = h('div', { class: 'empty empty-compact' },
    h('h2', {}, 'Waiting for messages'),
    h('p', {}, 'Messages appear here as devices send them. Check that a route delivers to this downstream.'));

  const messages = []; // newest last
  const pending = []; // arrived while paused
  const buckets = new Array(RATE_WINDOW).fill(0);
  let bucketSecond = Math.floor(Date.now() / 1000);
  let paused = false;
  let socket = null;
  let retry = 0;
  let retryTimer = null;
  let closedByUs = false;

  const feed = () => feeds.find((f) => f.key === feedSelect.value);

  const updateRouteWarning = () => {
    const delivering = routes.filter((r) => r.enabled !== false && r.downstreams.includes(feedSelect.value));
    replace(routeWarning, delivering.length === 0
      ? h('div', { class: 'callout callout-warn' },
        h('strong', {}, 'No route delivers to this downstream yet. '),
        'Messages appear only once a route sends them here. ',
        h('a', { href: '#/routes/new' }, 'Create a route'), '.')
      : []);
  };

  const setStatus = (text, tone) => {
    statusPill.textContent = text;
    statusPill.className = `badge badge-${tone}`;
  };

  const updateCounter = () => {
    counter.textContent = paused && pending.length
      ? `${messages.length} shown · ${pending.length} new while paused`
      : `${messages.length} of the last ${BUFFER} kept`;
  };

  const connect = () => {
    clearTimeout(retryTimer);
    if (socket) {
      closedByUs = true;
      socket.close();
    }
    const current = feed();
    const query = new URLSearchParams();
    if (listenerSelect.value) query.set('listener', listenerSelect.value);
    if (deviceInput.value.trim()) query.set('deviceId', deviceInput.value.trim());
    const scheme = window.location.protocol === 'https:' ? 'wss' : 'ws';
    const url = `${scheme}://${window.location.host}${current.path}${query.toString() ? `?${query}` : ''}`;
    setStatus('connecting', 'warn');
    closedByUs = false;
    const ws = new WebSocket(url);
    socket = ws;
    ws.addEventListener('open', () => {
      if (socket !== ws) return;
      retry = 0;
      setStatus(paused ? 'paused' : 'live', paused ? 'neutral' : 'ok');
    });
    ws.addEventListener('message', (event) => {
      if (socket !== ws) return;
      receive(event.data, current.format ?? 'envelope');
    });
    ws.addEventListener('close', (event) => {
      if (socket !== ws || closedByUs || ctx.signal.aborted) return;
      socket = null;
      // 1012: the downstream changed; reconnect at once. Otherwise back off up to 10 s.
      const delay = event.code === 1012 ? 500 : Math.min(10_000, 1000 * 2 ** retry);
      retry += 1;
      setStatus(`reconnecting in ${Math.round(delay / 1000) || 1} s`, 'bad');
      retryTimer = setTimeout(connect, delay);
      // A closed socket may mean the session ended; this call signs out on 401.
      if (retry > 1) api.get('/auth/me').catch(() => {});
    });
  };

  const receive = (data, format) => {
    const second = Math.floor(Date.now() / 1000);
    advanceBuckets(second);
    buckets[buckets.length - 1] += 1;
    let parsed;
    try {
      parsed = JSON.parse(data);
    } catch {
      parsed = data;
    }
    const item = { data: parsed, format, at: new Date() };
    if (paused) {
      pending.push(item);
      if (pending.length > BUFFER) pending.shift();
    } else {
      show(item);
    }
    updateCounter();
  };

  const advanceBuckets = (second) => {
    const steps = Math.min(RATE_WINDOW, second - bucketSecond);
    for (let i = 0; i < steps; i += 1) {
      buckets.shift();
      buckets.push(0);
    }
    if (steps > 0) bucketSecond = second;
  };

  const show = (item) => {
    messages.push(item);
    list.prepend(messageEl(item));
    while (messages.length > BUFFER) {
      messages.shift();
      list.lastElementChild?.remove();
    }
    empty.hidden = true;
  };

  const togglePause = () => {
    paused = !paused;
    pauseButton.textContent = paused ? 'Resume' : 'Pause';
    pauseButton.setAttribute('aria-pressed', String(paused));
    if (!paused) pending.splice(0).forEach(show);
    if (socket?.readyState === WebSocket.OPEN) setStatus(paused ? 'paused' : 'live', paused ? 'neutral' : 'ok');
    updateCounter();
  };

  const clearMessages = () => {
    messages.length = 0;
    pending.length = 0;
    list.replaceChildren();
    empty.hidden = false;
    updateCounter();
  };

  const drawTimer = setInterval(() => {
    advanceBuckets(Math.floor(Date.now() / 1000));
    rateText.textContent = String(buckets[buckets.length - 2] ?? 0);
    drawSparkline(canvas, buckets);
  }, 1000);

  ctx.onCleanup(() => {
    clearInterval(drawTimer);
    clearTimeout(retryTimer);
    closedByUs = true;
    socket?.close();
  });

  feedSelect.addEventListener('change', () => { updateRouteWarning(); connect(); });
  listenerSelect.addEventListener('change', connect);
  let deviceTimer;
  deviceInput.addEventListener('input', () => {
    clearTimeout(deviceTimer);
    deviceTimer = setTimeout(connect, 400);
  });

  updateRouteWarning();
  updateCounter();
  connect();
  drawSparkline(canvas, buckets);

  return h('div', { class: 'live' },
    routeWarning,
    h('div', { class: 'card live-controls' },
      h('div', { class: 'filters' },
        h('div', { class: 'field' }, h('label', { for: ids.feed }, 'Downstream'), feedSelect),
        h('div', { class: 'field' }, h('label', { for: ids.listener }, 'Listener'), listenerSelect),
        h('div', { class: 'field' }, h('label', { for: ids.device }, 'Device id'), deviceInput)),
      h('div', { class: 'live-bar' },
        h('div', { class: 'live-status' }, statusPill, counter),
        h('div', { class: 'rate' },
          h('div', { class: 'rate-label' }, rateText, h('span', { class: 'muted small' }, ' msg/s')),
          canvas),
        h('div', { class: 'button-group' }, pauseButton, clearButton))),
    empty,
    list);
}

function messageEl(item) {
  const envelope = item.format === 'envelope' && item.data && typeof item.data === 'object' && 'payload' in item.data;
  const meta = envelope
    ? [
      h('time', { datetime: item.data.receivedAt, title: item.data.receivedAt }, formatTime(item.data.receivedAt)),
      item.data.deviceId ? h('span', { class: 'tag' }, h('span', { class: 'tag-key' }, 'device'), item.data.deviceId) : null,
      item.data.deviceType ? h('span', { class: 'tag' }, h('span', { class: 'tag-key' }, 'type'), item.data.deviceType) : null,
      h('span', { class: 'tag' }, h('span', { class: 'tag-key' }, 'listener'), item.data.listenerKey),
    ]
    : [h('time', { datetime: item.at.toISOString() }, formatTime(item.at.toISOString()))];
  return h('li', { class: 'message' },
    h('div', { class: 'message-meta' }, meta),
    h('pre', { class: 'json' }, prettyJson(envelope ? item.data.payload : item.data)));
}

/** Bars of messages per second, newest on the right; crisp on high-DPI screens. */
function drawSparkline(canvas, buckets) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 240;
  const height = canvas.clientHeight || 48;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const g = canvas.getContext('2d');
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  const max = Math.max(1, ...buckets);
  const bar = width / buckets.length;
  const styles = getComputedStyle(canvas);
  g.fillStyle = styles.getPropertyValue('--spark-base').trim() || '#e2e8f0';
  g.fillRect(0, height - 1, width, 1);
  g.fillStyle = styles.getPropertyValue('--spark-bar').trim() || '#2f5bea';
  buckets.forEach((count, i) => {
    if (count === 0) return;
    const barHeight = Math.max(2, (count / max) * (height - 4));
    g.fillRect(i * bar + 0.5, height - barHeight, Math.max(1, bar - 1), barHeight);
  });
}

