// Small DOM helpers shared by every screen: element building, dialogs, toasts, copy buttons,
// time formatting. Everything is built with DOM APIs (no innerHTML with data), so the strict
// Content-Security-Policy holds and nothing a device sends can become markup.

/** h('div', {class: 'x', onclick: fn, 'aria-label': 'y'}, child, [children], 'text') */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  applyProps(el, props);
  append(el, children);
  return el;
}

const SVG_NS = 'http://www.w3.org/2000/svg';

/** Same as h() for SVG elements. */
export function svg(tag, props, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(props ?? {})) {
    if (value !== undefined && value !== null && value !== false) el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function applyProps(el, props) {
  for (const [name, value] of Object.entries(props ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      el.addEventListener(name.slice(2), value);
    } else if (name === 'class') {
      el.className = Array.isArray(value) ? value.filter(Boolean).join(' ') : value;
    } else if (name === 'dataset') {
      Object.assign(el.dataset, value);
    } else if (name === 'text') {
      el.textContent = value;
    } else if (name in el && typeof value !== 'string') {
      el[name] = value; // properties such as checked, disabled, value
    } else if (name === 'value') {
      el.value = value;
    } else {
      el.setAttribute(name, value === true ? '' : String(value));
    }
  }
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Replaces an element's children; like h(), flattens arrays and skips null / false. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

let idCounter = 0;
/** A document-unique id with a readable prefix. */
export function uid(prefix = 'id') {
  idCounter += 1;
  return `${prefix}-${idCounter}`;
}

// ---------------------------------------------------------------------------------------------
// Buttons, badges, states

export function button(label, onclick, { kind = 'secondary', type = 'button', title, small } = {}) {
  return h('button', { type, class: ['btn', `btn-${kind}`, small && 'btn-small'], onclick, title }, label);
}

export function linkButton(label, href, { kind = 'secondary', small } = {}) {
  return h('a', { href, class: ['btn', `btn-${kind}`, small && 'btn-small'] }, label);
}

export function badge(text, tone = 'neutral', title) {
  return h('span', { class: ['badge', `badge-${tone}`], title }, text);
}

/** A page heading block: title, optional lead text and actions on the right. */
export function pageHeader(title, { lead, actions = [], crumbs } = {}) {
  return h('header', { class: 'page-header' },
    crumbs ? h('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' },
      crumbs.map(([label, href], i) => [i > 0 && h('span', { class: 'crumb-sep', 'aria-hidden': 'true' }, '/'),
        href ? h('a', { href }, label) : h('span', {}, label)])) : null,
    h('div', { class: 'page-header-row' },
      h('div', { class: 'page-title' },
        h('h1', { tabindex: '-1' }, title),
        lead ? h('p', { class: 'lead' }, lead) : null),
      actions.length ? h('div', { class: 'page-actions' }, actions) : null));
}

export function loadingState(text = 'Loading…') {
  return h('div', { class: 'state state-loading', role: 'status' }, h('span', { class: 'spinner', 'aria-hidden': 'true' }), text);
}

export function errorState(error, retry) {
  return h('div', { class: 'callout callout-error', role: 'alert' },
    h('strong', {}, 'Could not load this page. '),
    h('span', {}, error?.message ?? String(error)),
    retry ? h('div', { class: 'callout-actions' }, button('Try again', retry, { small: true })) : null);
}

/** An empty state that says what to do next. */
export function emptyState(title, text, actions = []) {
  return h('div', { class: 'empty' },
    h('h2', {}, title),
    h('p', {}, text),
    actions.length ? h('div', { class: 'empty-actions' }, actions) : null);
}

// ---------------------------------------------------------------------------------------------
// Dialogs (native <dialog>: focus is trapped, Esc closes it)

/**
 * Opens a modal dialog. `build(close)` returns the body nodes. Resolves with the value passed
 * to close() (undefined when dismissed with Esc).
 */
export function openDialog({ title, build, wide = false, onClose }) {
  return new Promise((resolve) => {
    const titleId = uid('dialog-title');
    const dialog = h('dialog', { class: ['dialog', wide && 'dialog-wide'], 'aria-labelledby': titleId });
    let result;
    const close = (value) => {
      result = value;
      dialog.close();
    };
    dialog.append(
      h('div', { class: 'dialog-head' },
        h('h2', { id: titleId }, title),
        h('button', { type: 'button', class: 'icon-btn', 'aria-label': 'Close', onclick: () => close(undefined) }, '×')),
      h('div', { class: 'dialog-body' }, build(close)));
    dialog.addEventListener('close', () => {
      dialog.remove();
      onClose?.(result);
      resolve(result);
    });
    document.body.append(dialog);
    dialog.showModal();
    const focusTarget = dialog.querySelector('[autofocus], .dialog-body input:not([readonly]), .dialog-body .btn-primary, .dialog-body .btn-danger');
    focusTarget?.focus();
  });
}

/** Asks for confirmation; resolves true when confirmed. `action` may throw to show an error. */
export function confirmDialog({ title, message, confirmLabel = 'Confirm', danger = false, action }) {
  return openDialog({
    title,
    build: (close) => {
      const error = h('p', { class: 'form-error', role: 'alert', hidden: true });
      const confirm = button(confirmLabel, async () => {
        confirm.disabled = true;
        error.hidden = true;
        try {
          if (action) await action();
          close(true);
        } catch (e) {
          error.textContent = e.message;
          error.hidden = false;
          confirm.disabled = false;
        }
      }, { kind: danger ? 'danger' : 'primary' });
      return [
        typeof message === 'string' ? h('p', {}, message) : message,
        error,
        h('div', { class: 'dialog-actions' }, button('Cancel', () => close(false)), confirm),
      ];
    },
  }).then((value) => value === true);
}

// ---------------------------------------------------------------------------------------------
// Toasts

let toastRegion;
export function toast(message, tone = 'success') {
  if (!toastRegion) {
    toastRegion = h('div', { class: 'toasts', role: 'status', 'aria-live': 'polite' });
    document.body.append(toastRegion);
  }
  const item = h('div', { class: ['toast', `toast-${tone}`] }, message);
  toastRegion.append(item);
  setTimeout(() => item.classList.add('toast-leaving'), 3500);
  setTimeout(() => item.remove(), 4000);
}

// ---------------------------------------------------------------------------------------------
// Copying

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // Clipboard API needs a secure context (https or localhost); fall back to a selection copy.
    const area = h('textarea', { class: 'offscreen', readonly: true }, text);
    document.body.append(area);
    area.select();
    const ok = document.execCommand('copy');
    area.remove();
    return ok;
  }
}

export function copyButton(getText, label = 'Copy') {
  const btn = button(label, async () => {
    const ok = await copyText(typeof getText === 'function' ? getText() : getText);
    btn.textContent = ok ? 'Copied' : 'Select and copy';
    setTimeout(() => { btn.textContent = label; }, 1500);
  }, { small: true });
  return btn;
}

/** A read-only value with a copy button, e.g. a URL or an access key. */
export function copyField(label, value, { id = uid('copy'), mono = true } = {}) {
  const input = h('input', { id, class: ['input', mono && 'mono'], readonly: true, value, spellcheck: 'false' });
  input.addEventListener('focus', () => input.select());
  return h('div', { class: 'field' },
    h('label', { for: id }, label),
    h('div', { class: 'input-row' }, input, copyButton(() => input.value)));
}

export function codeBlock(text, { label } = {}) {
  return h('div', { class: 'code' },
    h('div', { class: 'code-head' }, h('span', {}, label ?? ''), copyButton(text)),
    h('pre', { tabindex: '0' }, h('code', {}, text)));
}

// ---------------------------------------------------------------------------------------------
// Formatting

export function formatTime(iso) {
  if (!iso) return '—';
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return date.toLocaleString(undefined, { year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

export function relativeTime(iso) {
  if (!iso) return 'never';
  const date = new Date(iso);
  const seconds = Math.round((Date.now() - date.getTime()) / 1000);
  if (Number.isNaN(seconds)) return iso;
  if (seconds < 5) return 'just now';
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return formatTime(iso);
}

/** A <time> element showing relative time with the absolute time as tooltip. */
export function timeEl(iso, { relative = true } = {}) {
  return h('time', { datetime: iso ?? '', title: iso ? formatTime(iso) : '' }, relative ? relativeTime(iso) : formatTime(iso));
}

export function formatNumber(n) {
  return typeof n === 'number' ? n.toLocaleString() : '—';
}

export function prettyJson(value) {
  if (typeof value === 'string') return value;
  return JSON.stringify(value, null, 2);
}

/** camelCase → "Camel case" for labels without an x-ui-label. */
export function humanize(name) {
  const words = name.replace(/([a-z0-9])([A-Z])/g, '$1 $2').replace(/[_-]+/g, ' ').toLowerCase();
  return words.charAt(0).toUpperCase() + words.slice(1);
}

export function debounce(fn, ms) {
  let timer;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}
