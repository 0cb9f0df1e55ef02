// Listeners: the list with live state (polled every 2 s), the detail page with the URL devices
// connect to and copy-paste client examples, and the schema-generated create / edit forms.

import { api, definitionPath, schema as loadSchema } from './api.js';
import {
  badge, button, codeBlock, copyField, emptyState, errorState, formatNumber, h, linkButton, loadingState,
  pageHeader, replace, timeEl, toast, uid,
} from './dom.js';
import {
  confirmDelete, definitionScreens, displayValue, nameCell, propertyLabel, rowActions, setEnabled,
} from './definitions.js';
import { clientExamples } from './examples.js';

const POLL_MS = 2000;

const config = {
  kind: 'listeners',
  schemaName: 'listener',
  singular: 'listener',
  title: 'Listeners',
  formLead: 'Where devices connect (server mode) or where iotgate connects out to (client mode). Changes apply at once, without a restart.',
  initial: { listenerType: 'websocket', mode: 'server', contentType: 'json', anonymous: true, enabled: true },
  afterSave: (key) => `#/listeners/${encodeURIComponent(key)}`,
  detailHref: (key) => `#/listeners/${encodeURIComponent(key)}`,
};

const forms = definitionScreens(config);
export const create = forms.create;
export const edit = forms.edit;

const STATE_TONES = { running: 'ok', connecting: 'warn', retrying: 'warn', error: 'bad', disabled: 'neutral', stopped: 'neutral' };

export function stateBadge(status) {
  const state = status?.state ?? 'unknown';
  return badge(state, STATE_TONES[state] ?? 'neutral', status?.lastError ?? undefined);
}

/** Polls `load` every 2 s while the screen is shown; never two requests at once. */
function poll(ctx, load) {
  let busy = false;
  const tick = async () => {
    if (busy || ctx.signal.aborted || document.hidden) return;
    busy = true;
    try {
      await load();
    } finally {
      busy = false;
    }
  };
  const timer = setInterval(tick, POLL_MS);
  ctx.onCleanup(() => clearInterval(timer));
}

export async function list(main, params, ctx) {
  const body = h('div', {});
  main.append(pageHeader('Listeners', {
    lead: 'Devices connect to server-mode listeners; client-mode listeners connect out. State and counters refresh every 2 seconds.',
    actions: [linkButton('New listener', '#/listeners/new', { kind: 'primary' })],
  }), body);
  const statusNote = h('p', { class: 'muted small poll-note', role: 'status' });
  let rows = new Map();

  const applyStatuses = (statuses) => {
    for (const status of statuses) rows.get(status.key)?.(status);
  };
  const refreshStatuses = async () => {
    try {
      applyStatuses(await api.get('/status/listeners'));
      statusNote.textContent = `Live · updated ${new Date().toLocaleTimeString()}`;
      statusNote.classList.remove('is-stale');
    } catch (error) {
      statusNote.textContent = `Status unavailable: ${error.message}`;
      statusNote.classList.add('is-stale');
    }
  };

  const load = async () => {
    body.replaceChildren(loadingState('Loading listeners…'));
    try {
      const [items, statuses] = await Promise.all([api.get('/listeners'), api.get('/status/listeners')]);
      if (ctx.signal.aborted) return;
      if (items.length === 0) {
        rows = new Map();
        body.replaceChildren(emptyState('No listeners yet',
          'A listener is where devices connect. Create a sentinel first if devices will authenticate with access keys, then a listener that uses it.',
          [linkButton('Create a listener', '#/listeners/new', { kind: 'primary' }), linkButton('Create a sentinel', '#/sentinels/new')]));
        return;
      }
      const table = listenerTable(items, load);
      rows = table.rows;
      body.replaceChildren(table.element, statusNote);
      applyStatuses(statuses);
      statusNote.textContent = `Live · updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      if (!ctx.signal.aborted) body.replaceChildren(errorState(error, load));
    }
  };
  await load();
  poll(ctx, refreshStatuses);
}

function listenerTable(items, reload) {
  const rows = new Map();
  const tbody = h('tbody', {});
  for (const item of items) {
    const state = h('div', { class: 'state-cell' }, badge('…', 'neutral'));
    const url = h('span', { class: 'mono small url-cell' }, '—');
    const connections = h('span', { class: 'small muted' });
    const messages = h('span', { class: 'num messages-cell' }, '—');
    rows.set(item.key, (status) => {
      replace(state, stateBadge(status), connections,
        status.lastError ? h('span', { class: 'small error-text', title: status.lastError }, status.lastError) : null);
      url.textContent = status.url ?? '—';
      url.title = status.url ?? '';
      connections.textContent = `${formatNumber(status.connections)} connection${status.connections === 1 ? '' : 's'}`;
      replace(messages,
        h('span', { class: 'num-main' }, `${formatNumber(status.messagesReceived)} received`),
        h('span', { class: 'small muted' },
          h('span', { class: status.messagesAccepted ? 'ok-text' : '' }, `${formatNumber(status.messagesAccepted)} accepted`), ' · ',
          h('span', { class: status.messagesRejected ? 'error-text' : '' }, `${formatNumber(status.messagesRejected)} rejected`)));
    });
    tbody.append(h('tr', { dataset: { key: item.key } },
      h('td', { 'data-label': 'Name' }, nameCell(item, `#/listeners/${encodeURIComponent(item.key)}`,
        `${item.key} · ${item.mode} · ${item.contentType}`)),
      h('td', { 'data-label': 'Address' }, url),
      h('td', { 'data-label': 'State' }, state),
      h('td', { 'data-label': 'Messages', class: 'col-num' }, messages),
      h('td', { class: 'col-actions' }, rowActions(config, item, reload))));
  }
  const element = h('div', { class: 'card table-card' }, h('table', { class: 'table' },
    h('thead', {}, h('tr', {},
      h('th', { scope: 'col' }, 'Name'),
      h('th', { scope: 'col' }, 'Address'),
      h('th', { scope: 'col' }, 'State'),
      h('th', { scope: 'col', class: 'col-num' }, 'Messages'),
      h('th', { scope: 'col', class: 'col-actions' }, h('span', { class: 'sr-only' }, 'Actions')))),
    tbody));
  return { element, rows };
}

/** The URL devices connect to: the status URL, else built from the definition. */
export function deviceUrl(listener, status) {
  if (status?.url) return status.url;
  const scheme = listener.secure ? 'wss' : 'ws';
  if (listener.mode === 'client') {
    return `${scheme}://${listener.hostName}${listener.port ? `:${listener.port}` : ''}${listener.path}`;
  }
  if (listener.port) {
    const host = listener.hostName && listener.hostName !== '0.0.0.0' ? listener.hostName : window.location.hostname;
    return `${scheme}://${host}:${listener.port}${listener.path}`;
  }
  return `${window.location.protocol === 'https:' ? 'wss' : 'ws'}://${window.location.host}${listener.path}`;
}

export async function detail(main, params, ctx) {
  const key = params.key;
  const body = h('div', {}, loadingState('Loading the listener…'));
  main.append(body);
  const load = async () => {
    try {
      const [listener, schemaDoc] = await Promise.all([api.get(definitionPath('listeners', key)), loadSchema('listener')]);
      const [status, sentinel] = await Promise.all([
        api.get(`/listeners/${encodeURIComponent(key)}/status`).catch(() => null),
        listener.sentinel ? api.get(definitionPath('sentinels', listener.sentinel)).catch(() => null) : null,
      ]);
      if (ctx.signal.aborted) return;
      body.replaceChildren(...renderDetail(listener, status, sentinel, schemaDoc, ctx));
    } catch (error) {
      if (!ctx.signal.aborted) {
        body.replaceChildren(pageHeader('Listener', { crumbs: [['Listeners', '#/listeners'], [key]] }), errorState(error, load));
      }
    }
  };
  await load();
}

function renderDetail(listener, status, sentinel, schemaDoc, ctx) {
  const enabled = listener.enabled !== false;
  const toggle = button(enabled ? 'Disable' : 'Enable', async () => {
    toggle.disabled = true;
    try {
      await setEnabled('listeners', listener.key, !enabled);
      toast(`Listener ${listener.key} ${enabled ? 'disabled' : 'enabled'}.`);
      ctx.reload();
    } catch (error) {
      toast(error.message, 'error');
      toggle.disabled = false;
    }
  });
  const header = pageHeader(listener.name, {
    crumbs: [['Listeners', '#/listeners'], [listener.key]],
    lead: listener.description ?? null,
    actions: [
      linkButton('Edit', `#/listeners/${encodeURIComponent(listener.key)}/edit`, { kind: 'primary' }),
      toggle,
      button('Delete', () => confirmDelete(config, listener.key, () => ctx.navigate('#/listeners')), { kind: 'danger-quiet' }),
    ],
  });

  const url = deviceUrl(listener, status);
  const statusList = h('dl', { class: 'stats' });
  const renderStatus = (s) => {
    replace(statusList,
      stat('State', h('span', { class: 'state-cell' }, stateBadge(s), s?.since ? h('span', { class: 'muted small' }, 'since ', timeEl(s.since)) : null)),
      stat('Connections', formatNumber(s?.connections)),
      stat('Received', formatNumber(s?.messagesReceived)),
      stat('Accepted', formatNumber(s?.messagesAccepted)),
      stat('Rejected', formatNumber(s?.messagesRejected)),
      s?.lastError ? stat('Last error', h('span', { class: 'error-text' }, s.lastError), 'stat-wide') : null);
  };
  renderStatus(status);
  poll(ctx, async () => {
    try {
      renderStatus(await api.get(`/listeners/${encodeURIComponent(listener.key)}/status`));
    } catch {
      // The next tick tries again; a deleted listener leaves this page anyway.
    }
  });

  const connect = listener.mode === 'client'
    ? h('section', { class: 'card' },
      h('h2', {}, 'Remote server'),
      h('p', {}, 'In client mode iotgate connects out to this server, reconnects on its own, and treats every message it receives as a device message.'),
      copyField('Remote URL', url))
    : h('section', { class: 'card' },
      h('h2', {}, 'Connect a device'),
      h('p', {}, 'Devices open a WebSocket to this URL', listener.subProtocol ? [' offering the sub-protocol ', h('code', {}, listener.subProtocol)] : '', '.',
        listener.anonymous === false ? ' They authenticate with Basic credentials (the listener\'s user name and password).' : '',
        sentinel ? [' The sentinel ', h('a', { href: `#/sentinels/${encodeURIComponent(sentinel.key)}` }, sentinel.name), ' checks each device against the registry.'] : ''),
      copyField('Device URL', url),
      examplesTabs(clientExamples(listener, sentinel, url)));

  const summary = h('section', { class: 'card' },
    h('h2', {}, 'Definition'),
    h('dl', { class: 'definition-list' }, (schemaDoc['x-ui-order'] ?? Object.keys(schemaDoc.properties)).flatMap((name) => {
      if (name === 'password') {
        return listener.anonymous === false ? [h('dt', {}, 'Password'), h('dd', { class: 'muted' }, 'stored, never shown')] : [];
      }
      if (listener[name] === undefined || name === 'description') return [];
      return [h('dt', {}, propertyLabel(schemaDoc, name)), h('dd', {}, displayValue(schemaDoc, name, listener[name]))];
    })));

  return [header, connect,
    h('div', { class: 'detail-grid' },
      h('section', { class: 'card' }, h('h2', {}, 'Status'), statusList),
      summary)];
}

function stat(label, value, extra) {
  return h('div', { class: ['stat', extra] }, h('dt', {}, label), h('dd', {}, value));
}

/** Accessible tabs (arrow keys move between them) over code examples. */
function examplesTabs(examples) {
  const id = uid('tabs');
  const tabs = [];
  const panels = [];
  const select = (index, focus) => {
    tabs.forEach((tab, i) => {
      tab.setAttribute('aria-selected', String(i === index));
      tab.tabIndex = i === index ? 0 : -1;
      panels[i].hidden = i !== index;
    });
    if (focus) tabs[index].focus();
  };
  examples.forEach((example, i) => {
    tabs.push(h('button', {
      type: 'button', role: 'tab', class: 'tab', id: `${id}-tab-${i}`, 'aria-controls': `${id}-panel-${i}`,
      onclick: () => select(i, false),
      onkeydown: (event) => {
        if (event.key === 'ArrowRight') select((i + 1) % examples.length, true);
        if (event.key === 'ArrowLeft') select((i + examples.length - 1) % examples.length, true);
      },
    }, example.label));
    panels.push(h('div', { role: 'tabpanel', id: `${id}-panel-${i}`, 'aria-labelledby': `${id}-tab-${i}`, class: 'tab-panel', dataset: { example: example.id } },
      example.note ? h('p', { class: 'muted small' }, example.note) : null,
      codeBlock(example.code, { label: example.file })));
  });
  select(0, false);
  return h('div', { class: 'examples' },
    h('div', { role: 'tablist', 'aria-label': 'Client examples', class: 'tabs' }, tabs), panels);
}
