// Users (admins only): who can sign in and with which role. A new user gets a password from
// the admin and changes it after signing in; a reset password signs the user out everywhere.
// The last admin can be neither demoted nor deleted (the server says so, and the UI shows it).

import { api, schema as loadSchema } from './api.js';
import {
  badge, button, confirmDialog, emptyState, errorState, h, loadingState, openDialog, pageHeader, timeEl, toast, uid,
} from './dom.js';
import { createSchemaForm } from './forms.js';

export const ROLE_LABELS = { viewer: 'Viewer', operator: 'Operator', admin: 'Admin' };
const ROLE_TONES = { viewer: 'neutral', operator: 'ok', admin: 'warn' };

export function roleBadge(role) {
  return badge(ROLE_LABELS[role] ?? role, ROLE_TONES[role] ?? 'neutral');
}

export async function screen(main, params, ctx) {
  const body = h('div', {}, loadingState('Loading users…'));
  main.append(pageHeader('Users', {
    lead: 'Viewers read everything but users and the audit log and watch the live view; operators also manage devices and their keys; admins change everything.',
    actions: [button('Add user', () => addUser(load), { kind: 'primary' })],
  }), body);

  async function load() {
    try {
      const answer = await api.get('/users');
      if (ctx.signal.aborted) return;
      body.replaceChildren(answer.items.length === 0
        ? emptyState('No users', 'Add a user to let someone else sign in.')
        : usersTable(answer.items, ctx.user, load));
    } catch (error) {
      if (!ctx.signal.aborted) body.replaceChildren(errorState(error, load));
    }
  }
  await load();
}

function usersTable(users, me, reload) {
  return h('div', { class: 'card table-card' }, h('table', { class: 'table' },
    h('thead', {}, h('tr', {},
      h('th', { scope: 'col' }, 'User'),
      h('th', { scope: 'col' }, 'Role'),
      h('th', { scope: 'col' }, 'Created'),
      h('th', { scope: 'col', class: 'col-actions' }, h('span', { class: 'sr-only' }, 'Actions')))),
    h('tbody', {}, users.map((user) => userRow(user, me, reload)))));
}

function userRow(user, me, reload) {
  const path = `/users/${encodeURIComponent(user.userName)}`;
  const selectId = uid('role');
  const role = h('select', { id: selectId, class: 'input role-select', 'aria-label': `Role of ${user.userName}` },
    Object.entries(ROLE_LABELS).map(([value, label]) => h('option', { value, selected: value === user.role }, label)));
  role.addEventListener('change', async () => {
    role.disabled = true;
    try {
      await api.patch(path, { role: role.value });
      toast(`${user.userName} is now ${ROLE_LABELS[role.value].toLowerCase()}.`);
      await reload();
    } catch (error) {
      toast(error.message, 'error');
      role.value = user.role;
      role.disabled = false;
    }
  });
  return h('tr', { dataset: { user: user.userName } },
    h('td', { 'data-label': 'User' }, h('div', { class: 'name-cell' },
      h('span', { class: 'strong' }, user.userName),
      user.userName === me?.userName ? h('span', { class: 'muted small' }, 'you') : null)),
    h('td', { 'data-label': 'Role', dataset: { role: user.role } }, role),
    h('td', { 'data-label': 'Created' }, timeEl(user.createdAt)),
    h('td', { class: 'col-actions' }, h('div', { class: 'row-actions' },
      button('Reset password…', () => resetPassword(user), { small: true }),
      button('Delete', () => confirmDialog({
        title: `Delete user ${user.userName}?`,
        message: h('p', {}, h('strong', {}, user.userName), ' can no longer sign in; their sessions and API tokens stop working at once.'),
        confirmLabel: 'Delete user',
        danger: true,
        action: () => api.delete(path),
      }).then((deleted) => {
        if (deleted) {
          toast(`Deleted user ${user.userName}.`);
          reload();
        }
      }), { small: true, kind: 'danger-quiet' }))));
}

/** A dialog with a schema form; `submit(value)` may throw an ApiError shown beside its field. */
export async function formDialog({ title, schemaName, initial, submitLabel, submit }) {
  const schemaDoc = await loadSchema(schemaName).catch((error) => {
    toast(error.message, 'error');
    return null;
  });
  if (!schemaDoc) return undefined;
  const form = await createSchemaForm(schemaDoc, { initial });
  return openDialog({
    title,
    wide: true,
    build: (close) => {
      const container = h('div', {});
      const save = h('button', { type: 'submit', class: 'btn btn-primary' }, submitLabel);
      const element = h('form', { novalidate: true }, form.element,
        h('div', { class: 'dialog-actions' }, button('Cancel', () => close(undefined)), save));
      element.addEventListener('submit', async (event) => {
        event.preventDefault();
        save.disabled = true;
        form.clearErrors();
        try {
          const result = await submit(form.value(), container, close);
          if (result !== undefined) close(result);
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
}

async function addUser(reload) {
  const created = await formDialog({
    title: 'Add a user',
    schemaName: 'user',
    initial: { role: 'viewer' },
    submitLabel: 'Add user',
    submit: (value) => api.post('/users', value),
  });
  if (created) {
    toast(`Added ${created.userName}. Give them the password; they can change it after signing in.`);
    reload();
  }
}

async function resetPassword(user) {
  const done = await formDialog({
    title: `New password for ${user.userName}`,
    schemaName: 'user-patch',
    initial: {},
    submitLabel: 'Set password',
    submit: async (value) => {
      await api.patch(`/users/${encodeURIComponent(user.userName)}`, { password: value.password ?? '' });
      return true;
    },
  });
  if (done) toast(`Password of ${user.userName} set; their sessions have ended.`);
}
