// The admin UI's shell: sign-in, the navigation, and a hash router (#/listeners, ...). Each
// screen is a function (main, params, ctx) from its own module; ctx gives it an abort signal,
// cleanup hooks (timers, sockets), navigate() and reload().

import { ApiError, auth, SIGNED_OUT_EVENT } from './api.js';
import * as account from './account.js';
import * as audit from './audit.js';
import { button, errorState, h, toast, uid } from './dom.js';
import * as deadletters from './deadletters.js';
import * as devices from './devices.js';
import * as listeners from './listeners.js';
import * as live from './live.js';
import { downstreams, routes, sentinels } from './pipeline.js';
import * as telemetry from './telemetry.js';
import * as tokens from './tokens.js';
import * as users from './users.js';

const NAV = [
  { section: 'Pipeline', items: [
    ['listeners', 'Listeners'],
    ['sentinels', 'Sentinels'],
    ['routes', 'Routes'],
    ['downstreams', 'Downstreams'],
  ] },
  { section: 'Devices & data', items: [
    ['devices', 'Devices'],
    ['live', 'Live telemetry'],
    ['telemetry', 'Stored telemetry'],
    ['deadletters', 'Dead letters'],
  ] },
  { section: 'Access', items: [
    ['users', 'Users', 'admin'],
    ['tokens', 'API tokens'],
    ['audit', 'Audit log', 'admin'],
  ] },
];

const TITLES = { telemetry: 'Stored telemetry', deadletters: 'Dead letters', tokens: 'API tokens', audit: 'Audit log' };

const ROUTES = [
  ['listeners', listeners.list],
  ['listeners/new', listeners.create],
  ['listeners/:key', listeners.detail],
  ['listeners/:key/edit', listeners.edit],
  ...[['sentinels', sentinels], ['routes', routes], ['downstreams', downstreams]].flatMap(([kind, screens]) => [
    [kind, screens.list],
    [`${kind}/new`, screens.create],
    [`${kind}/:key`, screens.edit],
    [`${kind}/:key/edit`, screens.edit],
  ]),
  ['devices', devices.screen],
  ['live', live.screen],
  ['telemetry', telemetry.screen],
  ['deadletters', deadletters.screen],
  ['users', users.screen],
  ['tokens', tokens.screen],
  ['audit', audit.screen],
];

const root = document.getElementById('app');
/** The signed-in user: {userName, role}. */
let user = null;
let current = null; // {controller, cleanups}
let firstRender = true;

function match(path) {
  const segments = path.split('/').filter(Boolean);
  for (const [pattern, screen] of ROUTES) {
    const parts = pattern.split('/');
    if (parts.length !== segments.length) continue;
    const params = {};
    const ok = parts.every((part, i) => {
      if (part.startsWith(':')) {
        params[part.slice(1)] = decodeURIComponent(segments[i]);
        return true;
      }
      return part === segments[i];
    });
    if (ok) return { screen, params, section: parts[0] };
  }
  return null;
}

function currentPath() {
  return window.location.hash.replace(/^#/, '') || '/listeners';
}

// ---------------------------------------------------------------------------------------------
// Sign-in

function renderLogin(message) {
  leaveScreen();
  const ids = { user: uid('user'), password: uid('password') };
  const error = h('div', { class: 'callout callout-error', role: 'alert', hidden: !message }, message ?? '');
  const userInput = h('input', { id: ids.user, class: 'input', name: 'username', autocomplete: 'username', value: 'admin', required: true });
  const passwordInput = h('input', { id: ids.password, class: 'input', name: 'password', type: 'password', autocomplete: 'current-password', required: true });
  const submit = h('button', { type: 'submit', class: 'btn btn-primary btn-block' }, 'Sign in');
  let lockTimer;

  const lockFor = (seconds) => {
    clearInterval(lockTimer);
    let left = seconds;
    submit.disabled = true;
    const tick = () => {
      error.textContent = `Too many attempts, retry in ${left} s.`;
      error.hidden = false;
      if (left <= 0) {
        clearInterval(lockTimer);
        submit.disabled = false;
        error.textContent = 'You can try again now.';
      }
      left -= 1;
    };
    tick();
    lockTimer = setInterval(tick, 1000);
  };

  const form = h('form', { class: 'login-form', novalidate: true },
    h('div', { class: 'field' }, h('label', { for: ids.user }, 'User name'), userInput),
    h('div', { class: 'field' }, h('label', { for: ids.password }, 'Password'), passwordInput),
    error,
    submit);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (!passwordInput.value) {
      error.textContent = 'Enter the password.';
      error.hidden = false;
      passwordInput.focus();
      return;
    }
    submit.disabled = true;
    submit.textContent = 'Signing in…';
    error.hidden = true;
    try {
      await auth.login(userInput.value.trim(), passwordInput.value);
      const me = await auth.me();
      clearInterval(lockTimer);
      user = me;
      renderShell();
    } catch (e) {
      submit.textContent = 'Sign in';
      submit.disabled = false;
      passwordInput.select();
      if (e instanceof ApiError && e.status === 429) {
        lockFor(e.retryAfter || Number(/(\d+)\s*s/.exec(e.message)?.[1]) || 60);
      } else if (e instanceof ApiError && e.status === 401) {
        error.textContent = 'Wrong user name or password.';
        error.hidden = false;
      } else {
        error.textContent = e.message;
        error.hidden = false;
      }
    }
  });

  root.replaceChildren(h('main', { class: 'login' },
    h('div', { class: 'login-card' },
      h('div', { class: 'brand brand-large' }, h('img', { src: '/assets/logo.svg', alt: '', width: 36, height: 36 }), h('span', {}, 'iotgate')),
      h('h1', {}, 'Sign in'),
      h('p', { class: 'muted' }, 'Administration of listeners, devices and routes.'),
      form,
      h('p', { class: 'muted small login-hint' },
        'On the first start the admin password comes from IOTGATE_ADMIN_PASSWORD, or was printed once on standard output.'))));
  (message ? passwordInput : userInput.value ? passwordInput : userInput).focus();
}

// ---------------------------------------------------------------------------------------------
// Shell and router

let shell = null;

function renderShell() {
  const main = h('main', { id: 'main', class: 'content', tabindex: '-1' });
  const navLinks = new Map();
  const menuButton = h('button', {
    type: 'button', class: 'menu-btn', 'aria-expanded': 'false', 'aria-controls': 'sidebar',
    onclick: () => setMenu(menuButton.getAttribute('aria-expanded') !== 'true'),
  }, h('span', { class: 'menu-icon', 'aria-hidden': 'true' }), h('span', { class: 'sr-only' }, 'Menu'));
  const sidebar = h('aside', { id: 'sidebar', class: 'sidebar' }, h('div', { class: 'sidebar-inner' },
    h('a', { class: 'brand', href: '#/listeners' }, h('img', { src: '/assets/logo.svg', alt: '', width: 28, height: 28 }), h('span', {}, 'iotgate')),
    h('nav', { 'aria-label': 'Main' }, NAV.map((group) => h('div', { class: 'nav-group' },
      h('p', { class: 'nav-heading' }, group.section),
      h('ul', {}, group.items.filter(([, , role]) => !role || user?.role === role).map(([section, label]) => {
        const link = h('a', { href: `#/${section}`, class: 'nav-link' }, label);
        navLinks.set(section, link);
        return h('li', {}, link);
      }))))),
    h('div', { class: 'sidebar-foot' },
      h('span', { class: 'user', title: `${user?.userName} (${user?.role})` },
        h('span', { class: 'avatar', 'aria-hidden': 'true' }, (user?.userName ?? '?').charAt(0).toUpperCase()),
        h('span', { class: 'user-name' }, user?.userName), h('span', { class: 'muted small' }, user?.role)),
      h('div', { class: 'sidebar-foot-actions' },
        button('Change password', () => account.changePassword(), { small: true, kind: 'ghost' }),
        button('Sign out', signOut, { small: true, kind: 'ghost' })))));
  const setMenu = (open) => {
    menuButton.setAttribute('aria-expanded', String(open));
    sidebar.classList.toggle('open', open);
  };
  shell = { main, navLinks, setMenu };
  root.replaceChildren(
    h('a', { class: 'skip-link', href: '#main', onclick: (e) => { e.preventDefault(); main.focus(); } }, 'Skip to content'),
    h('div', { class: 'shell' },
      h('header', { class: 'topbar' }, menuButton,
        h('a', { class: 'brand', href: '#/listeners' }, h('img', { src: '/assets/logo.svg', alt: '', width: 24, height: 24 }), h('span', {}, 'iotgate'))),
      sidebar,
      main));
  route();
}

function leaveScreen() {
  if (!current) return;
  current.controller.abort();
  for (const fn of current.cleanups) {
    try {
      fn();
    } catch {
      // A cleanup failing must not keep the next screen from showing.
    }
  }
  current = null;
}

async function route() {
  if (!shell) return;
  leaveScreen();
  const path = currentPath();
  const found = match(path);
  const { main, navLinks, setMenu } = shell;
  setMenu(false);
  main.replaceChildren();
  for (const [section, link] of navLinks) {
    if (found?.section === section) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  if (!found) {
    main.append(errorState(new Error(`There is no page at #${path}.`)), h('p', {}, h('a', { href: '#/listeners' }, 'Go to the listeners')));
    return;
  }
  const controller = new AbortController();
  const cleanups = [];
  current = { controller, cleanups };
  const ctx = {
    signal: controller.signal,
    onCleanup: (fn) => cleanups.push(fn),
    navigate: (hash) => {
      if (window.location.hash === hash) route();
      else window.location.hash = hash;
    },
    reload: () => route(),
    user,
  };
  const label = TITLES[found.section] ?? found.section.charAt(0).toUpperCase() + found.section.slice(1);
  document.title = `${label} · iotgate`;
  try {
    await found.screen(main, found.params, ctx);
  } catch (error) {
    if (!controller.signal.aborted) main.append(errorState(error, () => route()));
  }
  if (!firstRender && !controller.signal.aborted) {
    main.querySelector('h1')?.focus({ preventScroll: false });
  }
  firstRender = false;
}

async function signOut() {
  try {
    await auth.logout();
  } catch {
    // Signed out either way once the cookie is gone or the token expired.
  }
  user = null;
  shell = null;
  renderLogin();
  toast('Signed out.');
}

window.addEventListener('hashchange', () => route());
window.addEventListener(SIGNED_OUT_EVENT, () => {
  if (!shell) return;
  shell = null;
  user = null;
  renderLogin('Your session has ended. Sign in again to continue.');
});
document.addEventListener('click', (event) => {
  // A tap outside the open menu (phones) closes it.
  if (shell && document.querySelector('.sidebar.open') && !event.target.closest('.sidebar, .menu-btn')) shell.setMenu(false);
});
document.addEventListener('keydown', (event) => {
  if (event.key === 'Escape' && shell?.main && document.querySelector('.sidebar.open')) shell.setMenu(false);
});

async function start() {
  try {
    user = await auth.me();
    renderShell();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) renderLogin();
    else root.replaceChildren(h('main', { class: 'login' }, h('div', { class: 'login-card' }, errorState(error, start))));
  }
}

start();
