// API tokens: long-lived credentials for scripts and dashboards. Everyone manages their own (an
// admin sees everyone's); a token is shown once, acts with its role (never above its owner's),
// and stops working at once when revoked.

import { api } from './api.js';
import {
  button, confirmDialog, copyField, emptyState, errorState, h, loadingState, pageHeader, timeEl, toast,
} from './dom.js';
import { formDialog, roleBadge } from './users.js';

const DEFAULT_DAYS = 90;

export async function screen(main, params, ctx) {
  const body = h('div', {}, loadingState('Loading tokens…'));
  main.append(pageHeader('API tokens', {
    lead: 'Tokens for automation, sent as Authorization: Bearer. A token acts with the role it was given, never above its owner\'s, until it expires or is revoked.',
    actions: [button('Create token', () => createToken(load), { kind: 'primary' })],
  }), body);

  async function load() {
    try {
      const answer = await api.get('/tokens');
      if (ctx.signal.aborted) return;
      body.replaceChildren(answer.items.length === 0
        ? emptyState('No API tokens', 'Create a token for a script or a dashboard instead of sharing a password.',
          [button('Create token', () => createToken(load), { kind: 'primary' })])
        : tokensTable(answer.items, ctx.user, load));
    } catch (error) {
      if (!ctx.signal.aborted) body.replaceChildren(errorState(error, load));
    }
  }
  await load();
}

function tokensTable(tokens, me, reload) {
  const showOwner = tokens.some((t) => t.userName !== me?.userName);
  return h('div', { class: 'card table-card' }, h('table', { class: 'table' },
    h('thead', {}, h('tr', {},
      h('th', { scope: 'col' }, 'Name'),
      showOwner ? h('th', { scope: 'col' }, 'Owner') : null,
      h('th', { scope: 'col' }, 'Role'),
      h('th', { scope: 'col' }, 'Expires'),
      h('th', { scope: 'col' }, 'Last used'),
      h('th', { scope: 'col', class: 'col-actions' }, h('span', { class: 'sr-only' }, 'Actions')))),
    h('tbody', {}, tokens.map((token) => {
      const expired = new Date(token.expiresAt) <= new Date();
      return h('tr', { dataset: { token: token.name } },
        h('td', { 'data-label': 'Name' }, h('span', { class: 'strong' }, token.name)),
        showOwner ? h('td', { 'data-label': 'Owner' }, token.userName) : null,
        h('td', { 'data-label': 'Role' }, roleBadge(token.role)),
        h('td', { 'data-label': 'Expires' }, expired ? h('span', { class: 'muted' }, 'expired') : timeEl(token.expiresAt, { relative: false })),
        h('td', { 'data-label': 'Last used' }, timeEl(token.lastUsedAt)),
        h('td', { class: 'col-actions' }, button('Revoke', () => confirmDialog({
          title: `Revoke token ${token.name}?`,
          message: 'It stops working at once, and live views opened with it are closed.',
          confirmLabel: 'Revoke token',
          danger: true,
          action: () => api.delete(`/tokens/${encodeURIComponent(token.id)}`),
        }).then((revoked) => {
          if (revoked) {
            toast(`Revoked ${token.name}.`);
            reload();
          }
        }), { small: true, kind: 'danger-quiet' })));
    }))));
}

async function createToken(reload) {
  const expires = new Date(Date.now() + DEFAULT_DAYS * 86_400_000);
  expires.setUTCHours(0, 0, 0, 0);
  const created = await formDialog({
    title: 'Create an API token',
    schemaName: 'api-token',
    initial: { role: 'viewer', expiresAt: expires.toISOString().replace('.000Z', 'Z') },
    submitLabel: 'Create token',
    submit: async (value, container, close) => {
      const token = await api.post('/tokens', value);
      container.replaceChildren(
        h('div', { class: 'callout callout-warn', role: 'alert' },
          h('strong', {}, 'Copy the token now: it will not be shown again. '),
          'iotgate keeps only a hash of it.'),
        copyField(`Token ${token.name}`, token.token),
        h('div', { class: 'dialog-actions' }, button('I have stored the token', () => close(token), { kind: 'primary' })));
      container.closest('dialog')?.querySelector('.dialog-head h2')?.replaceChildren('Token created');
      container.querySelector('input')?.focus();
      return undefined;
    },
  });
  if (created) {
    toast(`Created ${created.name}.`);
  }
  reload();
}
