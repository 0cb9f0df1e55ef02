// Stored telemetry: what the telemetry store kept, newest first, filtered by device, listener and
// time range, paged with the server's cursor ("Older messages" loads the next page; messages
// stored meanwhile never shift it). The same filters export everything as NDJSON or CSV.

import { api } from './api.js';
import { emptyState, errorState, h, loadingState, pageHeader, prettyJson, timeEl, uid, button } from './dom.js';

const PAGE = 50;

/** A datetime-local value (the browser's time zone) as RFC 3339 UTC, or null when empty. */
function instant(input) {
  if (!input.value) return null;
  const at = new Date(input.value);
  return Number.isNaN(at.getTime()) ? null : at.toISOString();
}

export async function screen(main, params, ctx) {
  const ids = { device: uid('device'), listener: uid('listener'), from: uid('from'), to: uid('to') };
  const device = h('input', { id: ids.device, class: 'input', type: 'search', placeholder: 'Device id', spellcheck: 'false', autocomplete: 'off' });
  const listener = h('input', { id: ids.listener, class: 'input', type: 'search', placeholder: 'Listener', spellcheck: 'false', autocomplete: 'off' });
  const from = h('input', { id: ids.from, class: 'input input-auto', type: 'datetime-local', step: '1', title: 'From (inclusive)' });
  const to = h('input', { id: ids.to, class: 'input input-auto', type: 'datetime-local', step: '1', title: 'To (exclusive)' });
  const rows = h('tbody', {});
  const more = button('Older messages', () => load(false), { small: true });
  const exportNdjson = h('a', { class: 'btn btn-secondary btn-small', download: 'telemetry.ndjson' }, 'Export NDJSON');
  const exportCsv = h('a', { class: 'btn btn-secondary btn-small', download: 'telemetry.csv' }, 'Export CSV');
  const body = h('div', {}, loadingState('Loading stored telemetry…'));
  const label = (id, text) => h('label', { for: id, class: 'sr-only' }, text);
  const form = h('form', { class: 'toolbar' },
    h('div', { class: 'toolbar-search' }, label(ids.device, 'Device id'), device),
    h('div', { class: 'toolbar-item' }, label(ids.listener, 'Listener'), listener),
    h('div', { class: 'toolbar-item' }, h('label', { for: ids.from, class: 'small muted' }, 'From '), from),
    h('div', { class: 'toolbar-item' }, h('label', { for: ids.to, class: 'small muted' }, 'To '), to),
    h('button', { type: 'submit', class: 'btn btn-secondary btn-small' }, 'Filter'),
    exportNdjson, exportCsv);
  main.append(pageHeader('Stored telemetry', {
    lead: 'Messages the telemetry store kept, newest first. Times are in your browser\'s time zone; "To" is exclusive. Exports stream every matching message.',
  }), form, body);

  function filters() {
    const query = new URLSearchParams();
    if (device.value.trim()) query.set('deviceId', device.value.trim());
    if (listener.value.trim()) query.set('listener', listener.value.trim());
    const fromAt = instant(from);
    const toAt = instant(to);
    if (fromAt) query.set('from', fromAt);
    if (toAt) query.set('to', toAt);
    return query;
  }

  let cursor = null;
  async function load(fresh) {
    if (fresh) {
      cursor = null;
      rows.replaceChildren();
    }
    const query = filters();
    exportNdjson.href = `/api/v1/telemetry/export?${query}`;
    exportCsv.href = `/api/v1/telemetry/export?${new URLSearchParams([...query, ['format', 'csv']])}`;
    query.set('limit', String(PAGE));
    if (cursor) query.set('cursor', cursor);
    try {
      const page = await api.get(`/telemetry?${query}`);
      if (ctx.signal.aborted) return;
      cursor = page.nextCursor;
      rows.append(...page.items.map(messageRow));
      more.hidden = !cursor;
      body.replaceChildren(rows.childElementCount === 0
        ? emptyState('No stored messages', 'Nothing matches these filters. Messages are kept by a telemetry store downstream that a route sends to.')
        : h('div', {}, h('div', { class: 'card table-card' }, h('table', { class: 'table table-telemetry' },
          h('thead', {}, h('tr', {},
            h('th', { scope: 'col' }, 'Received'),
            h('th', { scope: 'col' }, 'Device'),
            h('th', { scope: 'col' }, 'Listener'),
            h('th', { scope: 'col' }, 'Payload'))),
          rows)), h('div', { class: 'pager' }, more)));
    } catch (error) {
      if (!ctx.signal.aborted) body.replaceChildren(errorState(error, () => load(true)));
    }
  }
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    load(true);
  });
  await load(true);
}

function messageRow(item) {
  const payload = prettyJson(item.payload);
  return h('tr', { dataset: { id: item.id } },
    h('td', { 'data-label': 'Received', class: 'nowrap' }, timeEl(item.receivedAt)),
    h('td', { 'data-label': 'Device', class: 'mono small' }, item.deviceId ?? item.claimedDeviceId ?? '—'),
    h('td', { 'data-label': 'Listener', class: 'mono small' }, item.listenerKey),
    h('td', { 'data-label': 'Payload', class: 'col-payload' },
      h('details', {}, h('summary', {}, h('code', { class: 'small' }, payload.replace(/\s+/g, ' ').slice(0, 80))), h('pre', { class: 'json' }, payload))));
}
