// Devices: register (the access keys are shown once), search, page, enable / disable,
// regenerate a key (shown once), get a client URL with a connection token, delete; whether
// each is online, and a device's page of connections, recent presence events and a form to send
// it a message.

import { api, schema as loadSchema } from './api.js';
import {
  badge, button, confirmDialog, copyField, debounce, emptyState, errorState, formatNumber, h, loadingState,
  openDialog, pageHeader, prettyJson, timeEl, toast, uid,
} from './dom.js';
import { createSchemaForm } from './forms.js';

const PAGE_SIZE = 25;

export async function screen(main, params, ctx) {
  const state = { offset: 0, search: '' };
  const body = h('div', {});
  const searchId = uid('search');
  const search = h('input', {
    id: searchId, type: 'search', class: 'input', placeholder: 'Device id, name or type', autocomplete: 'off', spellcheck: 'false',
  });
  const toolbar = h('div', { class: 'toolbar' },
    h('div', { class: 'toolbar-search' }, h('label', { for: searchId, class: 'sr-only' }, 'Search devices'), search),
    button('Refresh', () => load(), { small: true }));
  main.append(pageHeader('Devices', {
    lead: 'The device registry. Each device has two access keys; a sentinel accepts either, so one can be rotated while the other is in use.',
    actions: [button('Register device', () => register(load), { kind: 'primary' })],
  }), toolbar, body);

  search.addEventListener('input', debounce(() => {
    state.search = search.value.trim();
    state.offset = 0;
    load();
  }, 250));

  async function load() {
    if (!body.firstChild) body.replaceChildren(loadingState('Loading devices…'));
    try {
      const query = new URLSearchParams({ offset: String(state.offset), limit: String(PAGE_SIZE), search: state.search });
      const page = await api.get(`/devices?${query}`);
      if (ctx.signal.aborted) return;
      if (page.items.length === 0 && state.offset > 0) {
        state.offset = Math.max(0, state.offset - PAGE_SIZE);
        return load();
      }
      body.replaceChildren(page.total === 0
        ? (state.search
          ? emptyState('No matching devices', `No device id, name or type contains “${state.search}”.`)
          : emptyState('No devices yet', 'Register a device to get its two access keys. The device sends its id and one key; the sentinel checks them on every message.',
            [button('Register device', () => register(load), { kind: 'primary' })]))
        : devicesTable(page, state, load));
    } catch (error) {
      if (!ctx.signal.aborted) body.replaceChildren(errorState(error, load));
    }
  }
  await load();
}

function devicesTable(page, state, reload) {
  const first = page.offset + 1;
  const last = page.offset + page.items.length;
  const previous = button('Previous', () => { state.offset = Math.max(0, state.offset - PAGE_SIZE); reload(); }, { small: true });
  const next = button('Next', () => { state.offset += PAGE_SIZE; reload(); }, { small: true });
  previous.disabled = page.offset === 0;
  next.disabled = last >= page.total;
  return h('div', {},
    h('div', { class: 'card table-card' }, h('table', { class: 'table' },
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col' }, 'Device'),
        h('th', { scope: 'col' }, 'Type'),
        h('th', { scope: 'col' }, 'Status'),
        h('th', { scope: 'col' }, 'Presence'),
        h('th', { scope: 'col' }, 'Last contact'),
        h('th', { scope: 'col', class: 'col-num' }, 'Messages'),
        h('th', { scope: 'col', class: 'col-actions' }, h('span', { class: 'sr-only' }, 'Actions')))),
      h('tbody', {}, page.items.map((device) => deviceRow(device, reload))))),
    h('nav', { class: 'pager', 'aria-label': 'Pages' },
      h('span', { class: 'muted' }, `${formatNumber(first)}–${formatNumber(last)} of ${formatNumber(page.total)}`),
      h('div', { class: 'pager-buttons' }, previous, next)));
}

function deviceRow(device, reload) {
  const path = `/devices/${encodeURIComponent(device.deviceId)}`;
  const toggle = button(device.enabled ? 'Disable' : 'Enable', async () => {
    toggle.disabled = true;
    try {
      await api.patch(path, { enabled: !device.enabled });
      toast(`Device ${device.deviceId} ${device.enabled ? 'disabled' : 'enabled'}.`);
      await reload();
    } catch (error) {
      toast(error.message, 'error');
      toggle.disabled = false;
    }
  }, { small: true });
  return h('tr', { dataset: { deviceId: device.deviceId } },
    h('td', { 'data-label': 'Device' }, h('div', { class: 'name-cell' },
      h('span', { class: 'strong' }, device.name), h('span', { class: 'mono muted small' }, device.deviceId))),
    h('td', { 'data-label': 'Type' }, device.deviceType),
    h('td', { 'data-label': 'Status' }, device.enabled ? badge('enabled', 'ok') : badge('disabled', 'neutral')),
    h('td', { 'data-label': 'Presence' }, presenceBadge(device)),
    h('td', { 'data-label': 'Last contact' }, timeEl(device.lastContact)),
    h('td', { 'data-label': 'Messages', class: 'col-num' }, formatNumber(device.messageCount)),
    h('td', { class: 'col-actions' }, h('div', { class: 'row-actions' },
      toggle,
      button('Details…', () => details(device, reload), { small: true }),
      button('Keys…', () => rotateKeys(device), { small: true }),
      button('Client URL…', () => clientUrl(device), { small: true }),
      button('Delete', () => confirmDialog({
        title: `Delete device ${device.deviceId}?`,
        message: h('p', {}, 'The device ', h('strong', { class: 'mono' }, device.deviceId),
          ' is removed from the registry and its keys stop working at once. Its stored telemetry stays.'),
        confirmLabel: 'Delete device',
        danger: true,
        action: () => api.delete(path),
      }).then((deleted) => {
        if (deleted) {
          toast(`Deleted device ${device.deviceId}.`);
          reload();
        }
      }), { small: true, kind: 'danger-quiet' }))));
}

/** The one-time display of freshly issued keys. */
function keysView(deviceId, keys, close) {
  return [
    h('div', { class: 'callout callout-warn', role: 'alert' },
      h('strong', {}, 'Copy the key now: it will not be shown again. '),
      'iotgate keeps only a hash of each key. If a key is lost, regenerate it.'),
    h('p', {}, 'Device ', h('strong', { class: 'mono' }, deviceId)),
    ...keys.map(([label, value]) => copyField(label, value)),
    h('div', { class: 'dialog-actions' },
      button(keys.length === 1 ? 'I have stored the key' : 'I have stored the keys', () => close(true), { kind: 'primary' })),
  ];
}

async function register(reload) {
  const schemaDoc = await loadSchema('device').catch((error) => {
    toast(error.message, 'error');
    return null;
  });
  if (!schemaDoc) return;
  const form = await createSchemaForm(schemaDoc, { initial: { enabled: true } });
  let created = false;
  await openDialog({
    title: 'Register a device',
    wide: true,
    build: (close) => {
      const container = h('div', {});
      const save = h('button', { type: 'submit', class: 'btn btn-primary' }, 'Register');
      const element = h('form', { novalidate: true }, form.element,
        h('div', { class: 'dialog-actions' }, button('Cancel', () => close(false)), save));
      element.addEventListener('submit', async (event) => {
        event.preventDefault();
        save.disabled = true;
        form.clearErrors();
        try {
          const device = await api.post('/devices', form.value());
          created = true;
          container.replaceChildren(...keysView(device.deviceId, [
            ['Primary access key', device.primaryAccessKey],
            ['Secondary access key', device.secondaryAccessKey],
          ], close));
          container.closest('dialog')?.querySelector('.dialog-head h2')?.replaceChildren('Device registered');
          container.querySelector('input')?.focus();
        } catch (error) {
          if (error.status !== 401) form.showErrors(error);
          save.disabled = false;
        }
      });
      container.append(element);
      setTimeout(() => form.focusFirst(), 0);
      return container;
    },
  });
  if (created) {
    toast('Device registered.');
    reload();
  }
}

function rotateKeys(device) {
  return openDialog({
    title: `Access keys of ${device.deviceId}`,
    build: (close) => {
      const container = h('div', {});
      const error = h('p', { class: 'form-error', role: 'alert', hidden: true });
      const rotate = (which) => async () => {
        error.hidden = true;
        try {
          const answer = await api.post(`/devices/${encodeURIComponent(device.deviceId)}/keys/${which}`);
          const key = answer[`${which}AccessKey`];
          container.replaceChildren(...keysView(device.deviceId, [[`New ${which} access key`, key]], close));
          container.querySelector('input')?.focus();
          toast(`New ${which} key issued for ${device.deviceId}.`);
        } catch (e) {
          error.textContent = e.message;
          error.hidden = false;
        }
      };
      container.append(
        h('p', {}, 'Keys are shown only when issued. Regenerating a key makes the old one stop working at once; the other key keeps working, so devices can move over one at a time.'),
        error,
        h('div', { class: 'dialog-actions dialog-actions-split' },
          button('Cancel', () => close(false)),
          h('div', { class: 'button-group' },
            button('Regenerate secondary', rotate('secondary')),
            button('Regenerate primary', rotate('primary'), { kind: 'danger' }))));
      return container;
    },
  });
}

/** Comma- or space-separated names, trimmed, without empties or repeats. */
function names(text) {
  return [...new Set(text.split(/[\s,]+/).map((n) => n.trim()).filter(Boolean))];
}

/** Listeners a connection token can be issued for: server mode, behind an HS256 token sentinel. */
async function tokenListeners() {
  const [listeners, sentinels] = await Promise.all([api.get('/listeners'), api.get('/sentinels')]);
  const issuing = new Set(sentinels
    .filter((s) => s.method === 'token' && (s.algorithm ?? 'HS256') === 'HS256')
    .map((s) => s.key));
  return listeners.filter((l) => l.mode === 'server' && issuing.has(l.sentinel));
}

/**
 * The Azure-portal-style "Client URL": a connection token (JWT) for one listener, with Web PubSub
 * roles, groups joined at connect and an expiry, shown as the ready-to-use WebSocket URL.
 */
async function clientUrl(device) {
  let listeners;
  try {
    listeners = await tokenListeners();
  } catch (error) {
    toast(error.message, 'error');
    return;
  }
  await openDialog({
    title: `Client URL for ${device.deviceId}`,
    wide: true,
    build: (close) => {
      if (listeners.length === 0) {
        return h('div', {},
          h('p', {}, 'No listener is behind a connection-token sentinel. Create a sentinel with the method ',
            h('strong', {}, 'Connection token (JWT)'), ' and a server listener that uses it.'),
          h('div', { class: 'dialog-actions' }, button('Close', () => close(false))));
      }
      const ids = { listener: uid('listener'), groups: uid('groups'), expires: uid('expires'), joinOnly: uid('join'), sendOnly: uid('send') };
      const listener = h('select', { id: ids.listener, class: 'input', name: 'listener' },
        listeners.map((l) => h('option', { value: l.key }, `${l.name} (${l.key})`)));
      const role = (value, title, desc) => {
        const id = uid('role');
        const input = h('input', { type: 'checkbox', id, value, name: 'role' });
        return { input, element: h('label', { class: 'choice', for: id }, input,
          h('span', { class: 'choice-text' }, h('span', { class: 'choice-title' }, title), h('span', { class: 'choice-desc mono' }, desc))) };
      };
      const joinAny = role('webpubsub.joinLeaveGroup', 'Join or leave any group', 'webpubsub.joinLeaveGroup');
      const sendAny = role('webpubsub.sendToGroup', 'Send to any group', 'webpubsub.sendToGroup');
      const joinOnly = h('input', { id: ids.joinOnly, class: 'input', placeholder: 'group names', autocomplete: 'off', spellcheck: 'false' });
      const sendOnly = h('input', { id: ids.sendOnly, class: 'input', placeholder: 'group names', autocomplete: 'off', spellcheck: 'false' });
      const groups = h('input', { id: ids.groups, class: 'input', placeholder: 'group names', autocomplete: 'off', spellcheck: 'false' });
      const expires = h('input', { id: ids.expires, class: 'input', type: 'number', min: '1', max: '525600', value: '60' });
      const error = h('p', { class: 'form-error', role: 'alert', hidden: true });
      const result = h('div', { class: 'client-url' });
      const submit = h('button', { type: 'submit', class: 'btn btn-primary' }, 'Get URL');
      const field = (id, label, control, help) => h('div', { class: 'field' },
        h('label', { for: id }, label), control, help && h('p', { class: 'help' }, help));
      const form = h('form', { novalidate: true, class: 'client-url-form' },
        field(ids.listener, 'Listener', listener),
        h('fieldset', { class: 'subfieldset' }, h('legend', {}, 'Roles'),
          h('div', { class: 'choices' }, joinAny.element, sendAny.element),
          h('div', { class: 'subfields' },
            field(ids.joinOnly, 'Join or leave only these groups', joinOnly, 'webpubsub.joinLeaveGroup.<group>'),
            field(ids.sendOnly, 'Send only to these groups', sendOnly, 'webpubsub.sendToGroup.<group>'))),
        field(ids.groups, 'Groups joined at connect', groups, 'Comma-separated; the webpubsub.group claim.'),
        field(ids.expires, 'Expires in (minutes)', expires, 'The connection ends when the token expires. At most 525600 (a year).'),
        error,
        h('div', { class: 'dialog-actions' }, button('Close', () => close(false)), submit),
        result);
      form.addEventListener('submit', async (event) => {
        event.preventDefault();
        error.hidden = true;
        submit.disabled = true;
        const roles = [
          ...[joinAny, sendAny].filter((r) => r.input.checked).map((r) => r.input.value),
          ...names(joinOnly.value).map((g) => `webpubsub.joinLeaveGroup.${g}`),
          ...names(sendOnly.value).map((g) => `webpubsub.sendToGroup.${g}`),
        ];
        const body = { listener: listener.value, roles, groups: names(groups.value), expiresInMinutes: Number(expires.value) };
        try {
          const answer = await api.post(`/devices/${encodeURIComponent(device.deviceId)}/token`, body);
          result.replaceChildren(
            copyField('Client URL', answer.url),
            h('p', { class: 'help' }, 'Anyone with this URL connects as ', h('strong', { class: 'mono' }, device.deviceId),
              ' until ', timeEl(answer.expiresAt, { relative: false }), '. It is not stored: copy it now.'));
          result.querySelector('input')?.focus();
        } catch (e) {
          const details = (e.details ?? []).map((d) => `${d.pointer || '/'}: ${d.message}`).join('; ');
          error.textContent = details ? `${e.message} (${details})` : e.message;
          error.hidden = false;
        } finally {
          submit.disabled = false;
        }
      });
      return form;
    },
  });
}
function presenceBadge(device) {
  const count = device.connections?.length ?? 0;
  return device.online
    ? badge(count > 1 ? `online (${count})` : 'online', 'ok', 'Open connections')
    : badge('offline', 'neutral', 'No open connection');
}

/** A device's connections, recent presence events, and a form to send it a message. */
function details(device, reload) {
  const path = `/devices/${encodeURIComponent(device.deviceId)}`;
  return openDialog({
    title: `Device ${device.deviceId}`,
    wide: true,
    onClose: () => reload(),
    build: () => {
      const live = h('div', { class: 'device-presence' }, loadingState('Loading presence…'));
      const refresh = async () => {
        try {
          const [current, events] = await Promise.all([api.get(path), api.get(`${path}/events?limit=20`)]);
          live.replaceChildren(
            h('p', {}, presenceBadge(current), ' ',
              h('span', { class: 'muted small' }, 'Recent events are those this node saw.')),
            current.connections.length === 0
              ? h('p', { class: 'muted' }, 'No open connection.')
              : h('table', { class: 'table' },
                h('thead', {}, h('tr', {},
                  h('th', { scope: 'col' }, 'Connection'), h('th', { scope: 'col' }, 'Listener'),
                  h('th', { scope: 'col' }, 'From'), h('th', { scope: 'col' }, 'Since'))),
                h('tbody', {}, current.connections.map((c) => h('tr', {},
                  h('td', { class: 'mono' }, String(c.connectionId)), h('td', { class: 'mono' }, c.listener),
                  h('td', { class: 'mono small' }, c.sourceAddress ?? '—'), h('td', {}, timeEl(c.connectedAt)))))),
            h('h3', {}, 'Recent presence events'),
            events.items.length === 0
              ? h('p', { class: 'muted' }, 'None since this node started.')
              : h('ul', { class: 'presence-events' }, events.items.map((e) => h('li', { dataset: { type: e.type } },
                e.type === '$connected' ? badge('connected', 'ok') : badge('disconnected', 'neutral'), ' ',
                timeEl(e.at), ' ',
                h('span', { class: 'mono small' }, `${e.listener} #${e.connectionId}`),
                e.type === '$disconnected' && e.closeCode != null
                  ? h('span', { class: 'small muted' }, ` closed ${e.closeCode}${e.closeReason ? ` (${e.closeReason})` : ''}`)
                  : null))));
        } catch (error) {
          live.replaceChildren(errorState(error, refresh));
        }
      };
      refresh();
      return h('div', {}, live, sendForm(device, refresh));
    },
  });
}

function sendForm(device, refresh) {
  const kindId = uid('kind');
  const bodyId = uid('body');
  const queueId = uid('queue');
  const kind = h('select', { id: kindId, class: 'input input-auto', name: 'kind' },
    h('option', { value: 'json' }, 'JSON'), h('option', { value: 'text' }, 'Text'));
  const body = h('textarea', { id: bodyId, class: 'input mono', name: 'message', rows: 4, spellcheck: 'false' });
  body.value = prettyJson({ command: 'ping' });
  const queue = h('input', { id: queueId, type: 'checkbox', name: 'queue' });
  const outcome = h('p', { class: 'small', role: 'status' });
  const send = h('button', { type: 'submit', class: 'btn btn-primary' }, 'Send');
  const form = h('form', { class: 'send-message', novalidate: true },
    h('h3', {}, 'Send a message'),
    h('div', { class: 'field' }, h('label', { for: kindId, class: 'field-label' }, 'Format'), kind),
    h('div', { class: 'field' }, h('label', { for: bodyId, class: 'field-label' }, 'Message'), body),
    h('div', { class: 'field' }, h('label', { for: queueId }, queue, ' Keep it for the next connection when the device is offline (1 hour)')),
    outcome,
    h('div', { class: 'dialog-actions' }, send));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    outcome.textContent = '';
    outcome.classList.remove('form-error');
    const target = `/devices/${encodeURIComponent(device.deviceId)}/messages${queue.checked ? '?queue=true' : ''}`;
    let parsed;
    if (kind.value === 'json') {
      try {
        parsed = JSON.parse(body.value);
      } catch (error) {
        outcome.textContent = `The message is not valid JSON: ${error.message}`;
        outcome.classList.add('form-error');
        return;
      }
    }
    send.disabled = true;
    try {
      const answer = kind.value === 'json' ? await api.post(target, parsed) : await api.postText(target, body.value);
      outcome.textContent = answer.queued
        ? `The device is offline: the message waits for its next connection until ${answer.expiresAt}.`
        : `Sent to ${answer.delivered} connection${answer.delivered === 1 ? '' : 's'}${answer.dropped ? ` (${answer.dropped} could not take it)` : ''}.`;
      refresh();
    } catch (error) {
      outcome.textContent = error.message;
      outcome.classList.add('form-error');
    } finally {
      send.disabled = false;
    }
  });
  return form;
}
