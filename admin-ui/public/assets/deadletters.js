// Dead letters: messages that could not be authenticated, routed or delivered, newest first,
// with their reason, the module that refused them, the device they claimed and the payload
// (never the credential).

import { api } from './api.js';
import { badge, button, emptyState, errorState, h, loadingState, pageHeader, prettyJson, timeEl, uid } from './dom.js';

const REASONS = {
  malformed_json: 'Not valid JSON',
  missing_credentials: 'No device credentials',
  unknown_device: 'Unknown device',
  device_disabled: 'Device disabled',
  invalid_key: 'Wrong access key',
  sentinel_unavailable: 'Sentinel not running',
  unrouted: 'No route matched',
  downlink_expired: 'Message to a device expired',
};

const AUTO_MS = 5000;

export async function screen(main, params, ctx) {
  const limitId = uid('limit');
  const limit = h('select', { id: limitId, class: 'input input-auto' },
    [100, 500, 1000].map((n) => h('option', { value: String(n) }, `Last ${n}`)));
  const autoId = uid('auto');
  const auto = h('input', { id: autoId, type: 'checkbox', class: 'switch', checked: true });
  const updated = h('span', { class: 'muted small', role: 'status' });
  const body = h('div', {}, loadingState('Loading dead letters…'));
  main.append(
    pageHeader('Dead letters', {
      lead: 'Messages that were refused or could not be delivered, newest first. Access keys are removed before anything is kept.',
      actions: [button('Refresh', () => load(), {})],
    }),
    h('div', { class: 'toolbar' },
      h('div', { class: 'toolbar-item' }, h('label', { for: limitId, class: 'sr-only' }, 'How many'), limit),
      h('label', { class: 'check', for: autoId }, auto, h('span', {}, 'Refresh every 5 s')),
      updated),
    body);

  let expanded = new Set();
  const load = async () => {
    try {
      const answer = await api.get(`/deadletters?limit=${limit.value}`);
      if (ctx.signal.aborted) return;
      updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
      if (answer.items.length === 0) {
        body.replaceChildren(emptyState('No dead letters',
          'Nothing has been refused. Messages with a wrong or missing key, from unknown or disabled devices, matching no route, or failing delivery show up here.'));
        return;
      }
      // Keep open payloads open across refreshes.
      expanded = new Set([...body.querySelectorAll('details[open]')].map((d) => d.dataset.id));
      body.replaceChildren(table(answer.items, expanded));
    } catch (error) {
      if (!ctx.signal.aborted) body.replaceChildren(errorState(error, load));
    }
  };
  limit.addEventListener('change', load);
  const timer = setInterval(() => {
    if (auto.checked && !document.hidden) load();
  }, AUTO_MS);
  ctx.onCleanup(() => clearInterval(timer));
  await load();
}

function table(items, expanded) {
  return h('div', { class: 'card table-card' }, h('table', { class: 'table table-deadletters' },
    h('thead', {}, h('tr', {},
      h('th', { scope: 'col' }, 'Time'),
      h('th', { scope: 'col' }, 'Reason'),
      h('th', { scope: 'col' }, 'Module'),
      h('th', { scope: 'col' }, 'Listener'),
      h('th', { scope: 'col' }, 'Device'),
      h('th', { scope: 'col' }, 'Payload'))),
    h('tbody', {}, items.map((item) => h('tr', { dataset: { reason: item.reason } },
      h('td', { 'data-label': 'Time', class: 'nowrap' }, timeEl(item.receivedAt)),
      h('td', { 'data-label': 'Reason' },
        h('div', { class: 'name-cell' },
          badge(REASONS[item.reason] ?? item.reason, 'bad', item.reason),
          item.message ? h('span', { class: 'small muted' }, item.message) : null)),
      h('td', { 'data-label': 'Module', class: 'mono small nowrap' }, item.module ?? '—'),
      h('td', { 'data-label': 'Listener', class: 'mono small nowrap' }, item.listenerKey ?? '—'),
      h('td', { 'data-label': 'Device', class: 'mono small nowrap' }, item.deviceId ?? '—'),
      h('td', { 'data-label': 'Payload', class: 'col-payload' }, payloadCell(item, expanded)))))));
}

function payloadCell(item, expanded) {
  if (item.payload === null || item.payload === undefined) return h('span', { class: 'muted small' }, 'not kept');
  const text = prettyJson(item.payload);
  const preview = text.replace(/\s+/g, ' ').slice(0, 60);
  return h('details', { dataset: { id: String(item.id) }, open: expanded.has(String(item.id)) },
    h('summary', {}, h('code', { class: 'small' }, preview.length < text.replace(/\s+/g, ' ').length ? `${preview}…` : preview)),
    h('pre', { class: 'json' }, text));
}
