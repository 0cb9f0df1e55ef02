// Devices: register (the access keys are shown once), search, page, enable / disable,
// regenerate a key (shown once), delete.

import { api, schema as loadSchema } from './api.js';
import {
  badge, button, confirmDialog, copyField, debounce, emptyState, errorState, formatNumber, h, loadingState,
  openDialog, pageHeader, timeEl, toast, uid,
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
    h('td', { 'data-label': 'Last contact' }, timeEl(device.lastContact)),
    h('td', { 'data-label': 'Messages', class: 'col-num' }, formatNumber(device.messageCount)),
    h('td', { class: 'col-actions' }, h('div', { class: 'row-actions' },
      toggle,
      button('Keys…', () => rotateKeys(device), { small: true }),
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
