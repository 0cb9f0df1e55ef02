// Screens shared by every definition kind (listeners, sentinels, routes, downstreams): the list,
// and the create / edit form generated from the kind's JSON Schema. Kind-specific screens
// (listeners.js) reuse the form and the row actions.

import { api, definitionPath, schema as loadSchema } from './api.js';
import {
  badge, button, confirmDialog, emptyState, errorState, h, humanize, linkButton, loadingState, pageHeader, toast,
} from './dom.js';
import { createSchemaForm } from './forms.js';

/** Display label of a property: x-ui-label or the humanized name. */
export function propertyLabel(schemaDoc, name) {
  return schemaDoc.properties?.[name]?.['x-ui-label'] ?? humanize(name);
}

/** A stored value as short text for tables and summaries. */
export function displayValue(schemaDoc, name, value) {
  const prop = schemaDoc.properties?.[name] ?? {};
  if (value === undefined || value === null || (Array.isArray(value) && value.length === 0)) {
    if (prop['x-ui-emptyText']) return prop['x-ui-emptyText'];
    return prop.default !== undefined ? `${displayValue({ properties: { [name]: { ...prop, default: undefined } } }, name, prop.default)} (default)` : '—';
  }
  const labels = prop['x-ui-enumLabels'] ?? {};
  if (Array.isArray(value)) return value.join(', ');
  if (typeof value === 'boolean') return value ? 'yes' : 'no';
  if (typeof value === 'object') {
    if (prop.writeOnly) return '••••';
    return Object.entries(value).map(([k, v]) => `${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`).join(', ');
  }
  if (prop.writeOnly) return '••••';
  return labels[value] ?? String(value);
}

/** Enables or disables a definition: PUT of the stored document with `enabled` changed. */
export async function setEnabled(kind, key, enabled) {
  const definition = await api.get(definitionPath(kind, key));
  definition.enabled = enabled;
  return api.put(definitionPath(kind, key), definition);
}

/** Confirms and deletes; a definition still in use answers 409, shown in the dialog. */
export function confirmDelete(config, key, onDeleted) {
  return confirmDialog({
    title: `Delete ${config.singular} ${key}?`,
    message: h('p', {}, `The ${config.singular} `, h('strong', { class: 'mono' }, key),
      ` stops at once and its definition is removed. This cannot be undone.`),
    confirmLabel: `Delete ${config.singular}`,
    danger: true,
    action: () => api.delete(definitionPath(config.kind, key)),
  }).then((deleted) => {
    if (deleted) {
      toast(`Deleted ${config.singular} ${key}.`);
      onDeleted?.();
    }
    return deleted;
  });
}

/**
 * config: {kind: 'sentinels', schemaName: 'sentinel', singular: 'sentinel', title: 'Sentinels',
 *          lead, emptyTitle, emptyText, afterSave?(key) → hash}
 */
export function definitionScreens(config) {
  return {
    list: (main, params, ctx) => listScreen(config, main, ctx),
    create: (main, params, ctx) => formScreen(config, main, null, ctx),
    edit: (main, params, ctx) => formScreen(config, main, params.key, ctx),
  };
}

async function listScreen(config, main, ctx) {
  const body = h('div', {});
  main.append(pageHeader(config.title, {
    lead: config.lead,
    actions: [linkButton(`New ${config.singular}`, `#/${config.kind}/new`, { kind: 'primary' })],
  }), body);

  const load = async () => {
    body.replaceChildren(loadingState(`Loading ${config.kind}…`));
    try {
      const [items, schemaDoc] = await Promise.all([api.get(`/${config.kind}`), loadSchema(config.schemaName)]);
      if (ctx.signal.aborted) return;
      body.replaceChildren(items.length === 0
        ? emptyState(config.emptyTitle, config.emptyText, [linkButton(`Create a ${config.singular}`, `#/${config.kind}/new`, { kind: 'primary' })])
        : definitionTable(config, items, schemaDoc, load));
    } catch (error) {
      if (!ctx.signal.aborted) body.replaceChildren(errorState(error, load));
    }
  };
  await load();
}

function definitionTable(config, items, schemaDoc, reload) {
  const columns = schemaDoc['x-ui-columns'] ?? [];
  return h('div', { class: 'card table-card' },
    h('table', { class: 'table' },
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col' }, 'Name'),
        columns.map((c) => h('th', { scope: 'col' }, propertyLabel(schemaDoc, c))),
        h('th', { scope: 'col' }, 'Status'),
        h('th', { scope: 'col', class: 'col-actions' }, h('span', { class: 'sr-only' }, 'Actions')))),
      h('tbody', {}, items.map((item) => h('tr', { dataset: { key: item.key } },
        h('td', { 'data-label': 'Name' }, nameCell(item, `#/${config.kind}/${encodeURIComponent(item.key)}`)),
        columns.map((c) => h('td', { 'data-label': propertyLabel(schemaDoc, c) }, displayValue(schemaDoc, c, item[c]))),
        h('td', { 'data-label': 'Status' }, item.enabled === false ? badge('disabled', 'neutral') : badge('enabled', 'ok')),
        h('td', { class: 'col-actions' }, rowActions(config, item, reload)))))));
}

export function nameCell(item, href, subline = item.key) {
  return h('div', { class: 'name-cell' },
    h('a', { href, class: 'strong-link' }, item.name ?? item.key),
    h('span', { class: 'mono muted small' }, subline));
}

/** Edit, enable/disable and delete buttons of one row. */
export function rowActions(config, item, reload) {
  const enabled = item.enabled !== false;
  const toggle = button(enabled ? 'Disable' : 'Enable', async () => {
    toggle.disabled = true;
    try {
      await setEnabled(config.kind, item.key, !enabled);
      toast(`${capitalize(config.singular)} ${item.key} ${enabled ? 'disabled' : 'enabled'}.`);
      await reload();
    } catch (error) {
      toast(error.message, 'error');
      toggle.disabled = false;
    }
  }, { small: true });
  return h('div', { class: 'row-actions' },
    linkButton('Edit', `#/${config.kind}/${encodeURIComponent(item.key)}/edit`, { small: true }),
    config.rowExtras?.(item) ?? null,
    toggle,
    button('Delete', () => confirmDelete(config, item.key, reload), { small: true, kind: 'danger-quiet' }));
}

/** A 409 names a duplicate key or a path already in use: point it at that field. */
function withConflictPointer(error) {
  if (error.status !== 409 || error.details?.length) return error;
  const pointer = /already exists/.test(error.message) ? '/key'
    : /\bpath\b/.test(error.message) ? '/path'
      : /\bport\b/.test(error.message) ? '/port' : null;
  if (!pointer) return error;
  return { ...error, message: error.message, details: [{ pointer, message: error.message }] };
}

function capitalize(text) {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

async function formScreen(config, main, key, ctx) {
  const editing = key !== null;
  const crumbs = [[config.title, `#/${config.kind}`], [editing ? key : 'New']];
  const header = pageHeader(editing ? `Edit ${config.singular}` : `New ${config.singular}`, {
    crumbs, lead: editing ? null : config.formLead,
  });
  const body = h('div', {}, loadingState('Loading the form…'));
  main.append(header, body);
  try {
    const [schemaDoc, stored] = await Promise.all([
      loadSchema(config.schemaName),
      editing ? api.get(definitionPath(config.kind, key)) : Promise.resolve(config.initial ?? {}),
    ]);
    const form = await createSchemaForm(schemaDoc, { initial: stored, editing });
    if (ctx.signal.aborted) return;
    const save = h('button', { type: 'submit', class: 'btn btn-primary' }, editing ? 'Save changes' : `Create ${config.singular}`);
    const element = h('form', { class: 'card form-card', novalidate: true },
      form.element,
      h('div', { class: 'form-actions' },
        save,
        editing ? config.formExtras?.(stored) ?? null : null,
        linkButton('Cancel', editing && config.detailHref ? config.detailHref(key) : `#/${config.kind}`)));
    element.addEventListener('submit', async (event) => {
      event.preventDefault();
      save.disabled = true;
      const label = save.textContent;
      save.textContent = 'Saving…';
      form.clearErrors();
      try {
        const document = form.value();
        const saved = editing
          ? await api.put(definitionPath(config.kind, key), document)
          : await api.post(`/${config.kind}`, document);
        toast(`${capitalize(config.singular)} ${saved.key} saved.`);
        ctx.navigate(config.afterSave ? config.afterSave(saved.key) : `#/${config.kind}`);
      } catch (error) {
        if (error.status !== 401) form.showErrors(withConflictPointer(error));
      } finally {
        save.disabled = false;
        save.textContent = label;
      }
    });
    body.replaceChildren(element);
    if (!editing) form.focusFirst();
  } catch (error) {
    if (!ctx.signal.aborted) body.replaceChildren(errorState(error, () => ctx.reload()));
  }
}
