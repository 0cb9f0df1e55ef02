// The audit log (admins only): who changed what, when and from where; sign-ins and failed
// sign-ins; token use and device authentication failures summarized per minute. Newest first,
// filtered by user and action, paged with the server's cursor.

import { api } from './api.js';
import { badge, button, emptyState, errorState, h, loadingState, pageHeader, prettyJson, timeEl, uid } from './dom.js';

const ACTIONS = [
  ['', 'All actions'],
  ['auth.login', 'Sign-ins'],
  ['definition.create', 'Definitions created'],
  ['definition.update', 'Definitions changed'],
  ['definition.delete', 'Definitions deleted'],
  ['device.create', 'Devices registered'],
  ['device.update', 'Devices changed'],
  ['device.delete', 'Devices deleted'],
  ['device.key_rotate', 'Key rotations'],
  ['device.token_issue', 'Connection tokens issued'],
  ['sentinel.token_secret_rotate', 'Token secret rotations'],
  ['device.message', 'Messages to devices'],
  ['listener.message', 'Messages to listeners'],
  ['group.message', 'Messages to groups'],
  ['device.auth_failed', 'Device authentication failures'],
  ['user.create', 'Users added'],
  ['user.update', 'Users changed'],
  ['user.delete', 'Users deleted'],
  ['user.password_change', 'Password changes'],
  ['token.create', 'Tokens created'],
  ['token.revoke', 'Tokens revoked'],
  ['token.used', 'Token use'],
];
const PAGE = 50;

export async function screen(main, params, ctx) {
  const actorId = uid('actor');
  const actionId = uid('action');
  const actor = h('input', { id: actorId, class: 'input', type: 'search', placeholder: 'User', spellcheck: 'false', autocomplete: 'off' });
  const action = h('select', { id: actionId, class: 'input input-auto' }, ACTIONS.map(([value, label]) => h('option', { value }, label)));
  const rows = h('tbody', {});
  const more = button('Older entries', () => load(false), { small: true });
  const body = h('div', {}, loadingState('Loading the audit log…'));
  const form = h('form', { class: 'toolbar' },
    h('div', { class: 'toolbar-search' }, h('label', { for: actorId, class: 'sr-only' }, 'User'), actor),
    h('div', { class: 'toolbar-item' }, h('label', { for: actionId, class: 'sr-only' }, 'Action'), action),
    h('button', { type: 'submit', class: 'btn btn-secondary btn-small' }, 'Filter'));
  main.append(pageHeader('Audit log', {
    lead: 'Every change with who made it, when and from which address, sign-ins and failed sign-ins, token use and device authentication failures (summarized per minute). Secrets never appear.',
  }), form, body);

  let cursor = null;
  async function load(fresh) {
    if (fresh) {
      cursor = null;
      rows.replaceChildren();
    }
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (actor.value.trim()) query.set('actor', actor.value.trim());
    if (action.value) query.set('action', action.value);
    if (cursor) query.set('cursor', cursor);
    try {
      const page = await api.get(`/audit?${query}`);
      if (ctx.signal.aborted) return;
      cursor = page.nextCursor;
      rows.append(...page.items.map(entryRow));
      more.hidden = !cursor;
      body.replaceChildren(rows.childElementCount === 0
        ? emptyState('Nothing recorded', 'No entry matches these filters.')
        : h('div', {}, h('div', { class: 'card table-card' }, h('table', { class: 'table table-audit' },
          h('thead', {}, h('tr', {},
            h('th', { scope: 'col' }, 'Time'),
            h('th', { scope: 'col' }, 'Who'),
            h('th', { scope: 'col' }, 'Action'),
            h('th', { scope: 'col' }, 'Target'),
            h('th', { scope: 'col' }, 'From'),
            h('th', { scope: 'col' }, 'Details'))),
          rows)), h('div', { class: 'pager' }, more)));
    } catch (error) {
      if (!ctx.signal.aborted) body.replaceChildren(errorState(error, () => load(true)));
    }
  }
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    load(true);
  });
  action.addEventListener('change', () => load(true));
  await load(true);
}

function entryRow(entry) {
  const details = entry.details && Object.keys(entry.details).length ? prettyJson(entry.details) : null;
  return h('tr', { dataset: { action: entry.action } },
    h('td', { 'data-label': 'Time', class: 'nowrap' }, timeEl(entry.occurredAt)),
    h('td', { 'data-label': 'Who' }, h('div', { class: 'name-cell' },
      h('span', { class: 'strong' }, entry.actor ?? '—'),
      entry.credential ? h('span', { class: 'muted small mono' }, entry.credential) : null)),
    h('td', { 'data-label': 'Action' }, h('div', { class: 'name-cell' },
      h('span', { class: 'mono small' }, entry.action),
      entry.outcome === 'failure' ? badge('failed', 'bad') : null)),
    h('td', { 'data-label': 'Target', class: 'mono small' }, entry.targetKind ? `${entry.targetKind} ${entry.targetKey ?? ''}` : '—'),
    h('td', { 'data-label': 'From', class: 'mono small nowrap' }, entry.sourceAddress ?? '—'),
    h('td', { 'data-label': 'Details', class: 'col-payload' }, details
      ? h('details', {}, h('summary', {}, h('code', { class: 'small' }, details.replace(/\s+/g, ' ').slice(0, 60))), h('pre', { class: 'json' }, details))
      : h('span', { class: 'muted small' }, '—')));
}
