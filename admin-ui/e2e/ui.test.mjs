// The admin UI in a real browser against the real binary: sign-in, pipeline set-up through the
// schema-generated forms, validation errors beside their fields, device registration, then a
// real device client (the Node.js example the UI shows) whose messages appear in the live view
// and, with a wrong key, in the dead letters. Screenshots go to artifacts/.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { launchBrowser, runNode, screenshot, startServer, writeArtifact } from './harness.mjs';

const PASSWORD = 'correct-horse-battery-staple';
const WAIT = 10_000;

describe('admin UI in Chromium', { timeout: 170_000 }, () => {
  let server;
  let browser;
  let page;
  const pageErrors = [];
  const state = {};

  /** The form field of a JSON pointer, as the schema forms mark them. */
  const field = (pointer) => page.locator(`.schema-form [data-pointer="${pointer}"]`);
  const input = (pointer) => field(pointer).locator('input, select, textarea').first();
  const nav = (label) => page.locator('nav[aria-label="Main"] a', { hasText: label }).click();
  const heading = (text) => page.locator('main h1', { hasText: text }).waitFor({ timeout: WAIT });

  before(async () => {
    [server, browser] = await Promise.all([startServer({ password: PASSWORD }), launchBrowser()]);
    const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
    page = await context.newPage();
    page.setDefaultTimeout(WAIT);
    page.on('pageerror', (error) => pageErrors.push(`page error: ${error.message}`));
    page.on('console', (message) => {
      // Any Content-Security-Policy violation is a bug in the UI.
      if (message.type() === 'error' && /Content Security Policy|Refused to/i.test(message.text())) {
        pageErrors.push(`console: ${message.text()}`);
      }
    });
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  it('shows an error for a wrong password, then signs in', async () => {
    await page.goto(`${server.base}/`);
    await page.locator('form.login-form').waitFor();
    await page.fill('input[name=password]', 'not-the-password');
    await page.press('input[name=password]', 'Enter');
    await page.locator('.login-form [role=alert]', { hasText: 'Wrong user name or password' }).waitFor();
    await screenshot(page, '01-sign-in-error');

    await page.fill('input[name=password]', PASSWORD);
    await page.press('input[name=password]', 'Enter');
    await heading('Listeners');
    await page.locator('.empty', { hasText: 'No listeners yet' }).waitFor();
    await screenshot(page, '02-listeners-empty');
  });

  it('creates a sentinel through its schema form', async () => {
    await nav('Sentinels');
    await heading('Sentinels');
    await page.locator('.empty a', { hasText: 'Create a sentinel' }).click();
    await heading('New sentinel');
    await input('/key').fill('device-keys');
    await input('/name').fill('Device access keys');
    // Fields follow the method: the basic credential locator only shows for "basic".
    assert.equal(await field('/credential').isVisible(), false);
    await field('/method').locator('label', { hasText: 'Basic credential' }).click();
    await field('/credential').waitFor({ state: 'visible' });
    assert.equal(await field('/deviceId').isVisible(), false);
    await field('/method').locator('label', { hasText: 'Access key' }).click();
    await field('/deviceId').waitFor({ state: 'visible' });
    // A nested locator: choosing "body" shows its pointer field.
    await field('/deviceId').locator('select').selectOption({ label: 'Message body' });
    await field('/deviceId/pointer').waitFor({ state: 'visible' });
    await field('/deviceId').locator('select').selectOption({ index: 0 });
    await screenshot(page, '03-sentinel-form');
    await page.locator('button[type=submit]', { hasText: 'Create sentinel' }).click();
    await heading('Sentinels');
    await page.locator('tr[data-key="device-keys"]').waitFor();
    await screenshot(page, '04-sentinels');
  });

  it('creates the websocket downstream live at /live', async () => {
    await nav('Downstreams');
    await heading('Downstreams');
    await page.locator('.page-actions a', { hasText: 'New downstream' }).click();
    await heading('New downstream');
    await input('/key').fill('live');
    await input('/name').fill('Live view');
    assert.equal(await field('/path').isVisible(), false, 'path applies to websocket downstreams only');
    await field('/type').locator('label', { hasText: 'WebSocket' }).click();
    await input('/path').fill('/live');
    await page.locator('button[type=submit]').click();
    await page.locator('tr[data-key="live"]').waitFor();
    await screenshot(page, '05-downstreams');
  });

  it('creates a NATS downstream with a write-only password and tests its connection', async () => {
    await page.locator('.page-actions a', { hasText: 'New downstream' }).click();
    await heading('New downstream');
    await input('/key').fill('nats-out');
    await input('/name').fill('Telemetry to NATS');
    await field('/type').locator('label', { hasText: 'NATS / JetStream' }).click();
    // The form follows the type: broker fields show, the websocket path does not.
    await field('/subject').waitFor({ state: 'visible' });
    assert.equal(await field('/path').isVisible(), false, 'path applies to websocket downstreams only');
    assert.equal(await field('/topic').isVisible(), false, 'topic applies to mqtt downstreams only');
    assert.equal(await input('/password').getAttribute('type'), 'password');
    await input('/url').fill('nats://127.0.0.1:4222');
    await screenshot(page, '05b-nats-downstream-form');
    await page.locator('button[type=submit]').click();
    const row = page.locator('tr[data-key="nats-out"]');
    await row.waitFor();
    // The server tries the saved definition: connect, authenticate, publish a probe.
    await row.locator('button', { hasText: 'Test connection' }).click();
    await page.locator('.toast', { hasText: 'nats-out: connected, authenticated, probe published' })
      .waitFor({ timeout: 15_000 });
    // Types without a connection of their own have no such button.
    assert.equal(await page.locator('tr[data-key="live"] button', { hasText: 'Test connection' }).count(), 0);
    await screenshot(page, '05c-nats-test-connection');
  });

  it('shows each validation error beside its field', async () => {
    await nav('Listeners');
    await page.locator('.empty a', { hasText: 'Create a listener' }).click();
    await heading('New listener');
    // Anonymous is the default, so Basic credentials are not offered.
    assert.equal(await field('/userName').isVisible(), false);
    // Acknowledgement settings appear only for a listener that acknowledges.
    assert.equal(await field('/maxInFlight').isVisible(), false);
    await field('/acknowledge').locator('.choice', { hasText: 'Stored' }).click();
    await field('/maxInFlight').waitFor({ state: 'visible' });
    await field('/dedupWindowSeconds').waitFor({ state: 'visible' });
    await field('/messageId').waitFor({ state: 'visible' });
    await field('/acknowledge').locator('.choice', { hasText: 'None' }).click();
    await field('/maxInFlight').waitFor({ state: 'hidden' });
    await input('/key').fill('Plant_A');
    await input('/name').fill('Plant A devices');
    await input('/path').fill('devices');
    await input('/port').fill('70000');
    await input('/sentinel').selectOption('device-keys');
    await page.locator('button[type=submit]').click();
    const keyError = field('/key').locator('.field-error');
    await keyError.waitFor({ state: 'visible' });
    assert.match(await keyError.innerText(), /lowercase/);
    assert.match(await field('/path').locator('.field-error').innerText(), /Start with \//);
    assert.match(await field('/port').locator('.field-error').innerText(), /65535/);
    assert.equal(await input('/key').getAttribute('aria-invalid'), 'true');
    await screenshot(page, '06-listener-validation');
  });

  it('creates an anonymous listener with the sentinel and shows how devices connect', async () => {
    await input('/key').fill('plant-a');
    await input('/path').fill('/devices');
    await input('/port').fill('');
    // Switching to Basic credentials shows user name and password; back to anonymous hides them.
    await field('/anonymous').locator('input').uncheck();
    await field('/userName').waitFor({ state: 'visible' });
    await field('/anonymous').locator('input').check();
    await field('/userName').waitFor({ state: 'hidden' });
    // The nested WebSocket settings render as their own fieldset; one value set is stored alone.
    await field('/websocket').locator('legend', { hasText: 'WebSocket settings' }).waitFor();
    await input('/websocket/idleTimeoutSeconds').fill('600');
    await page.locator('button[type=submit]').click();
    await heading('Plant A devices');
    await page.locator('.definition-list dd', { hasText: 'idleTimeoutSeconds: 600' }).waitFor();
    const url = await page.locator('.field', { hasText: 'Device URL' }).locator('input').inputValue();
    assert.equal(url, `${server.base.replace('http', 'ws')}/devices`);
    await page.locator('.stats .badge', { hasText: 'running' }).waitFor();
    await page.getByRole('tab', { name: 'Node.js' }).click();
    state.nodeExample = await page.locator('[data-example="node"] pre').innerText();
    assert.match(state.nodeExample, /new WebSocket\("ws:\/\/127\.0\.0\.1:\d+\/devices"\)/);
    assert.match(state.nodeExample, /accessKey: ACCESS_KEY/);
    await page.getByRole('tab', { name: 'Python' }).click();
    assert.match(await page.locator('[data-example="python"] pre').innerText(), /websockets\.connect\(/);
    await page.getByRole('tab', { name: 'Browser' }).click();
    await screenshot(page, '07-listener-detail');
  });

  it('creates a route to the live downstream', async () => {
    await nav('Routes');
    await page.locator('.page-actions a', { hasText: 'New route' }).click();
    await heading('New route');
    await input('/key').fill('all-to-live');
    await input('/name').fill('Everything to the live view');
    await field('/downstreams').locator('input[value="live"]').check();
    await screenshot(page, '08-route-form');
    await page.locator('button[type=submit]').click();
    await page.locator('tr[data-key="all-to-live"]').waitFor();
    await screenshot(page, '09-routes');
  });

  it('registers a device and shows its keys once', async () => {
    await nav('Devices');
    await page.locator('.empty', { hasText: 'No devices yet' }).waitFor();
    await page.locator('.page-actions button', { hasText: 'Register device' }).click();
    const dialog = page.locator('dialog');
    await dialog.waitFor();
    await dialog.locator('[data-pointer="/deviceId"] input').fill('thermo-1');
    await dialog.locator('[data-pointer="/name"] input').fill('Thermostat, hall');
    await dialog.locator('[data-pointer="/deviceType"] input').fill('thermostat');
    await dialog.locator('[data-pointer="/deviceType"] input').press('Enter');
    await dialog.locator('.callout-warn', { hasText: 'will not be shown again' }).waitFor();
    state.accessKey = await dialog.locator('.field', { hasText: 'Primary access key' }).locator('input').inputValue();
    assert.match(state.accessKey, /^[A-Za-z0-9_-]{43}$/);
    await screenshot(page, '10-device-keys');
    await dialog.locator('button', { hasText: 'I have stored the keys' }).click();
    await dialog.waitFor({ state: 'detached' });
    await page.locator('tr[data-device-id="thermo-1"]').waitFor();
    // The key is not retrievable afterwards.
    const stored = await page.evaluate(async () => (await fetch('/api/v1/devices/thermo-1')).text());
    assert.ok(!stored.includes(state.accessKey), 'the key must not be readable again');
  });

  it('shows a real device message in the live view', async () => {
    await nav('Live telemetry');
    await heading('Live telemetry');
    await page.locator('.live-status .badge', { hasText: 'live' }).waitFor();
    // The Node.js example from the listener page, as an operator would paste it.
    const program = state.nodeExample
      .replace(/const DEVICE_ID = "[^"]*";/, 'const DEVICE_ID = "thermo-1";')
      .replace(/const ACCESS_KEY = "[^"]*";/, `const ACCESS_KEY = ${JSON.stringify(state.accessKey)};`);
    state.deviceOk = writeArtifact('device-ok.mjs', program);
    const run = await runNode(state.deviceOk);
    assert.equal(run.code, 0, run.output);
    assert.doesNotMatch(run.output, /error/i, run.output);
    const message = page.locator('.messages .message', { hasText: 'thermo-1' });
    await message.waitFor();
    assert.match(await message.locator('pre').innerText(), /"temperature": 21\.5/);
    assert.doesNotMatch(await message.innerText(), /accessKey/, 'the sentinel removes the key');
    // Paused, new messages wait aside; resuming shows them.
    await page.locator('.live-controls button', { hasText: 'Pause' }).click();
    await page.locator('.live-status .badge', { hasText: 'paused' }).waitFor();
    assert.equal((await runNode(state.deviceOk)).code, 0);
    await page.locator('.live-status', { hasText: '1 new while paused' }).waitFor();
    assert.equal(await page.locator('.messages .message').count(), 1);
    await page.locator('.live-controls button', { hasText: 'Resume' }).click();
    await page.waitForFunction(() => document.querySelectorAll('.messages .message').length === 2, null, { timeout: WAIT });
    await page.waitForTimeout(1100); // one sparkline tick
    await screenshot(page, '11-live');
  });

  it('pages stored telemetry newest first, by time range and device, with "Older messages"', async () => {
    // A store and a route to it (through the API: their forms are covered above).
    const created = await page.evaluate(async () => {
      const post = (kind, body) => fetch(`/api/v1/${kind}`, {
        method: 'POST', headers: { 'Content-Type': 'application/json', Accept: 'application/json' }, body: JSON.stringify(body),
      }).then((r) => r.status);
      return [
        await post('downstreams', { key: 'kept', name: 'Kept telemetry', type: 'store' }),
        await post('routes', { key: 'all-to-kept', name: 'Everything is kept', downstreams: ['kept'] }),
      ];
    });
    assert.deepEqual(created, [201, 201]);
    // 55 messages from the device: more than one page of 50.
    const program = writeArtifact('device-55.mjs', [
      'import WebSocket from "ws";',
      `const socket = new WebSocket(${JSON.stringify(`${server.base.replace('http', 'ws')}/devices`)});`,
      'socket.on("open", () => {',
      `  for (let seq = 1; seq <= 55; seq++) socket.send(JSON.stringify({ deviceId: "thermo-1", accessKey: ${JSON.stringify(state.accessKey)}, seq }));`,
      '  setTimeout(() => socket.close(), 500);',
      '});',
      'socket.on("message", (m) => { console.log(String(m)); process.exitCode = 1; });',
    ].join('\n'));
    assert.equal((await runNode(program)).code, 0);
    await page.waitForFunction(async () => (await (await fetch('/api/v1/telemetry?limit=100')).json()).items.length === 55, null, { timeout: WAIT });

    await nav('Stored telemetry');
    await heading('Stored telemetry');
    const rows = page.locator('table.table-telemetry tbody tr');
    await page.waitForFunction(() => document.querySelectorAll('table.table-telemetry tbody tr').length === 50, null, { timeout: WAIT });
    // Newest first: the first row is the last message sent.
    assert.match(await rows.first().innerText(), /"seq": ?55/);
    const older = page.locator('.pager button', { hasText: 'Older messages' });
    assert.equal(await older.isVisible(), true);
    await older.click();
    await page.waitForFunction(() => document.querySelectorAll('table.table-telemetry tbody tr').length === 55, null, { timeout: WAIT });
    assert.match(await rows.last().innerText(), /"seq": ?1\b/);
    assert.equal(await older.isVisible(), false, 'no older page after the last');
    await screenshot(page, '11b-stored-telemetry');

    // A time range that ends before anything was stored: nothing; cleared: everything again.
    await page.locator('input[type=datetime-local][title^="To"]').fill('2020-01-01T00:00:00');
    await page.locator('form.toolbar button[type=submit]', { hasText: 'Filter' }).click();
    await page.locator('.empty', { hasText: 'No stored messages' }).waitFor();
    await page.locator('input[type=datetime-local][title^="To"]').fill('');
    await page.locator('input[type=datetime-local][title^="From"]').fill('2020-01-01T00:00:00');
    await page.getByLabel('Device id').fill('thermo-1');
    await page.locator('form.toolbar button[type=submit]', { hasText: 'Filter' }).click();
    await page.waitForFunction(() => document.querySelectorAll('table.table-telemetry tbody tr').length === 50, null, { timeout: WAIT });
    const exportHref = await page.locator('a', { hasText: 'Export CSV' }).getAttribute('href');
    assert.match(exportHref, /deviceId=thermo-1/);
    assert.match(exportHref, /format=csv/);
    await page.getByLabel('Device id').fill('nobody');
    await page.locator('form.toolbar button[type=submit]', { hasText: 'Filter' }).click();
    await page.locator('.empty', { hasText: 'No stored messages' }).waitFor();
  });

  it('lists a message with a wrong key in Dead letters', async () => {
    const program = state.nodeExample
      .replace(/const DEVICE_ID = "[^"]*";/, 'const DEVICE_ID = "thermo-1";')
      .replace(/const ACCESS_KEY = "[^"]*";/, 'const ACCESS_KEY = "not-the-right-key";');
    const run = await runNode(writeArtifact('device-wrong-key.mjs', program));
    assert.match(run.output, /invalid_key/, run.output);
    await nav('Dead letters');
    await heading('Dead letters');
    const row = page.locator('tr[data-reason="invalid_key"]');
    await row.waitFor();
    assert.match(await row.innerText(), /thermo-1/);
    await row.locator('summary').click();
    assert.match(await row.locator('pre').innerText(), /21\.5/);
    assert.doesNotMatch(await row.innerText(), /not-the-right-key/, 'dead letters never keep the credential');
    await screenshot(page, '12-dead-letters');
  });

  it('shows live listener state and counters', async () => {
    await nav('Listeners');
    const row = page.locator('tr[data-key="plant-a"]');
    await row.locator('.badge', { hasText: 'running' }).waitFor();
    // Counters come from the 2-second status poll: 58 received (55 from the stored-telemetry test),
    // 57 accepted, one rejected.
    await page.waitForFunction(() => /58 received\s*57 accepted · 1 rejected/.test(document.querySelector('tr[data-key="plant-a"]')?.innerText ?? ''), null, { timeout: WAIT });
    await screenshot(page, '13-listeners');
    await nav('Devices');
    await page.locator('tr[data-device-id="thermo-1"]').waitFor();
    await screenshot(page, '14-devices');
  });

  it('shows a device offline with its presence events, and sends it a message', async () => {
    const row = page.locator('tr[data-device-id="thermo-1"]');
    await row.locator('.badge', { hasText: 'offline' }).waitFor();
    await row.locator('button', { hasText: 'Details' }).click();
    const dialog = page.locator('dialog');
    await dialog.waitFor();
    // The example program connected, sent, and closed: newest first.
    const events = dialog.locator('.presence-events li');
    await events.first().waitFor();
    assert.equal(await events.first().getAttribute('data-type'), '$disconnected');
    assert.equal(await events.last().getAttribute('data-type'), '$connected');
    await dialog.locator('p', { hasText: 'No open connection.' }).waitFor();
    // Offline: refused, unless queued for the next connection.
    await dialog.locator('textarea[name=message]').fill('{"setpoint": 19}');
    await dialog.locator('button[type=submit]', { hasText: 'Send' }).click();
    await dialog.locator('.send-message [role=status]', { hasText: 'has no open connection' }).waitFor();
    await dialog.locator('input[name=queue]').check();
    await dialog.locator('button[type=submit]', { hasText: 'Send' }).click();
    await dialog.locator('.send-message [role=status]', { hasText: 'waits for its next connection' }).waitFor();
    await screenshot(page, '14b-device-details');
    await page.keyboard.press('Escape');
    await dialog.waitFor({ state: 'detached' });
  });

  it("gives a device's client URL with a connection token, and the URL connects as it is", async () => {
    // A token sentinel through its schema form: the token fields follow the method.
    await nav('Sentinels');
    await heading('Sentinels');
    await page.locator('.page-actions a', { hasText: 'New sentinel' }).click();
    await heading('New sentinel');
    await input('/key').fill('client-tokens');
    await input('/name').fill('Client tokens');
    assert.equal(await field('/audience').isVisible(), false, 'token fields show for the token method only');
    await field('/method').locator('label', { hasText: 'Connection token (JWT)' }).click();
    await field('/audience').waitFor({ state: 'visible' });
    assert.equal(await field('/deviceId').isVisible(), false);
    await page.locator('button[type=submit]', { hasText: 'Create sentinel' }).click();
    await page.locator('tr[data-key="client-tokens"]').waitFor();
    // A listener behind it (through the API, as the listener form is covered above).
    const created = await page.evaluate(async () => (await fetch('/api/v1/listeners', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
      body: JSON.stringify({
        key: 'pubsub', name: 'Web PubSub clients', listenerType: 'websocket', mode: 'server',
        contentType: 'json', path: '/pubsub', anonymous: true, sentinel: 'client-tokens',
        protocol: 'webpubsub',
      }),
    })).status);
    assert.equal(created, 201);

    await nav('Devices');
    const row = page.locator('tr[data-device-id="thermo-1"]');
    await row.locator('button', { hasText: 'Client URL' }).click();
    const dialog = page.locator('dialog');
    await dialog.locator('h2', { hasText: 'Client URL for thermo-1' }).waitFor();
    await dialog.locator('select').selectOption('pubsub');
    await dialog.locator('.choice', { hasText: 'Send to any group' }).click();
    await dialog.getByLabel('Join or leave only these groups').fill('alerts');
    await dialog.getByLabel('Groups joined at connect').fill('alerts, hall');
    await dialog.getByLabel('Expires in (minutes)').fill('30');
    await dialog.locator('button[type=submit]', { hasText: 'Get URL' }).click();
    const urlField = dialog.locator('.field', { hasText: 'Client URL' }).locator('input');
    await urlField.waitFor();
    const url = await urlField.inputValue();
    const wsBase = server.base.replace(/^http/, 'ws');
    assert.ok(url.startsWith(`${wsBase}/pubsub?access_token=`), url);
    assert.equal(await dialog.locator('.client-url button', { hasText: 'Copy' }).count(), 1, 'a copy button');
    await screenshot(page, '14b-device-client-url');

    // The token carries what the form asked for.
    const claims = JSON.parse(Buffer.from(new URL(url).searchParams.get('access_token').split('.')[1], 'base64url').toString());
    assert.equal(claims.sub, 'thermo-1');
    assert.deepEqual(claims.role, ['webpubsub.sendToGroup', 'webpubsub.joinLeaveGroup.alerts']);
    assert.deepEqual(claims['webpubsub.group'], ['alerts', 'hall']);
    assert.ok(Math.abs(claims.exp - Date.now() / 1000 - 1800) < 10, `exp ${claims.exp}`);

    // A WebSocket client connects with the URL as it is; a changed token is refused with 401.
    const { WebSocket } = await import('ws');
    const opened = await new Promise((resolve) => {
      const socket = new WebSocket(url);
      socket.on('open', () => { socket.close(); resolve('open'); });
      socket.on('unexpected-response', (_, response) => resolve(`HTTP ${response.statusCode}`));
      socket.on('error', (error) => resolve(`error ${error.message}`));
    });
    assert.equal(opened, 'open');
    const refused = await new Promise((resolve) => {
      const [header, payload] = new URL(url).searchParams.get('access_token').split('.');
      const socket = new WebSocket(`${wsBase}/pubsub?access_token=${header}.${payload}.bm90LXRoZS1zaWduYXR1cmU`);
      socket.on('open', () => { socket.close(); resolve('open'); });
      socket.on('unexpected-response', (_, response) => resolve(`HTTP ${response.statusCode}`));
      socket.on('error', (error) => resolve(`error ${error.message}`));
    });
    assert.equal(refused, 'HTTP 401');

    // The browser itself, as the Web PubSub docs' HTML sample does: the URL and the sub-protocol.
    const greeting = await page.evaluate((clientUrl) => new Promise((resolve) => {
      const socket = new WebSocket(clientUrl, 'json.webpubsub.azure.v1');
      socket.onmessage = (event) => { socket.close(); resolve(JSON.parse(event.data)); };
      socket.onerror = () => resolve({ error: 'the browser could not connect' });
    }), url);
    assert.equal(greeting.type, 'system', JSON.stringify(greeting));
    assert.equal(greeting.event, 'connected');
    assert.equal(greeting.userId, 'thermo-1');
    await dialog.locator('button', { hasText: 'Close' }).first().click();
    await dialog.waitFor({ state: 'detached' });
  });

  it('edits the listener to Basic credentials without ever showing the password', async () => {
    await page.goto(`${server.base}/#/listeners/plant-a/edit`);
    await heading('Edit listener');
    assert.equal(await input('/key').getAttribute('readonly'), '', 'keys are immutable');
    await field('/anonymous').locator('input').uncheck();
    await input('/userName').fill('gateway');
    await page.locator('button[type=submit]').click();
    const passwordError = field('/password').locator('.field-error');
    await passwordError.waitFor({ state: 'visible' });
    assert.match(await passwordError.innerText(), /password is required/i);
    await input('/password').fill('gateway-secret');
    await page.locator('button[type=submit]').click();
    await heading('Plant A devices');
    await page.getByRole('tab', { name: 'Node.js' }).click();
    const example = await page.locator('[data-example="node"] pre').innerText();
    assert.match(example, /const USER_NAME = "gateway";/);
    assert.match(example, /Authorization: "Basic " \+ Buffer\.from/);
    assert.doesNotMatch(await page.locator('main').innerText(), /gateway-secret/);
    await page.goto(`${server.base}/#/listeners/plant-a/edit`);
    await heading('Edit listener');
    assert.equal(await input('/password').inputValue(), '');
    assert.match(await input('/password').getAttribute('placeholder'), /Leave empty to keep/);
    await screenshot(page, '15-listener-edit-basic');
  });

  it('adds a user, creates an API token shown once, and shows both in the audit log', async () => {
    await nav('Users');
    await heading('Users');
    await page.locator('tr[data-user="admin"]').waitFor();
    await page.locator('.page-actions button', { hasText: 'Add user' }).click();
    await page.locator('dialog h2', { hasText: 'Add a user' }).waitFor();
    await input('/userName').fill('vera');
    await input('/password').fill('short');
    await page.locator('dialog button[type=submit]', { hasText: 'Add user' }).click();
    await field('/password').locator('.field-error, [role=alert]').first().waitFor();
    await input('/password').fill(state.veraPassword = 'vera-password-1234');
    await page.locator('dialog button[type=submit]', { hasText: 'Add user' }).click();
    await page.locator('tr[data-user="vera"] td[data-role="viewer"]').waitFor();
    await screenshot(page, '18-users');

    await nav('API tokens');
    await heading('API tokens');
    await page.locator('.page-actions button', { hasText: 'Create token' }).click();
    await input('/name').fill('grafana');
    await page.locator('dialog button[type=submit]', { hasText: 'Create token' }).click();
    await page.locator('dialog h2', { hasText: 'Token created' }).waitFor();
    const token = await page.locator('dialog input[readonly]').inputValue();
    assert.match(token, /^iotg_[A-Za-z0-9_-]{40,}$/);
    await screenshot(page, '19-token-shown-once');
    await page.locator('dialog button', { hasText: 'I have stored the token' }).click();
    await page.locator('tr[data-token="grafana"]').waitFor();
    assert.equal(await page.locator('main').getByText(token).count(), 0, 'the token is listed after creation');
    // The token works on its own, from outside the browser.
    const me = await fetch(`${server.base}/api/v1/auth/me`, { headers: { authorization: `Bearer ${token}` } }).then((r) => r.json());
    assert.equal(me.tokenName, 'grafana');

    await nav('Audit log');
    await heading('Audit log');
    await page.locator('tr[data-action="user.create"]', { hasText: 'vera' }).waitFor();
    await page.locator('tr[data-action="token.create"]').waitFor();
    await page.locator('main select').selectOption('auth.login');
    await page.locator('tr[data-action="auth.login"]', { hasText: 'failed' }).first().waitFor();
    await screenshot(page, '20-audit-log');
  });

  it('lets a viewer change her password, without the admin screens', async () => {
    const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
    const viewer = await context.newPage();
    viewer.setDefaultTimeout(WAIT);
    viewer.on('pageerror', (error) => pageErrors.push(`viewer page error: ${error.message}`));
    const signIn = async (password) => {
      await viewer.goto(`${server.base}/`);
      await viewer.fill('input[name=username]', 'vera');
      await viewer.fill('input[name=password]', password);
      await viewer.press('input[name=password]', 'Enter');
      await viewer.locator('main h1', { hasText: 'Listeners' }).waitFor();
    };
    await signIn(state.veraPassword);
    const links = await viewer.locator('nav[aria-label="Main"] a').allTextContents();
    assert.ok(links.includes('API tokens') && !links.includes('Users') && !links.includes('Audit log'), links.join(', '));
    await viewer.locator('.sidebar button', { hasText: 'Change password' }).click();
    const vfield = (pointer) => viewer.locator(`dialog .schema-form [data-pointer="${pointer}"] input`);
    await vfield('/currentPassword').fill('not-her-password');
    await vfield('/newPassword').fill('veras-new-password');
    await viewer.locator('dialog button[type=submit]').click();
    await viewer.locator('dialog [data-pointer="/currentPassword"]', { hasText: 'wrong' }).waitFor();
    await vfield('/currentPassword').fill(state.veraPassword);
    await viewer.locator('dialog button[type=submit]').click();
    await viewer.locator('.toast', { hasText: 'Password changed' }).waitFor();
    await screenshot(viewer, '21-viewer-password-changed');
    await viewer.locator('.sidebar button', { hasText: 'Sign out' }).click();
    await viewer.locator('form.login-form').waitFor();
    await signIn('veras-new-password');
    await context.close();
  });

  it('fits a phone screen', async () => {
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(`${server.base}/#/listeners`);
    await page.locator('tr[data-key="plant-a"]').waitFor();
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `the page is ${overflow}px wider than a phone`);
    await page.waitForTimeout(300); // the menu's slide-out transition after the resize
    await screenshot(page, '16-phone-listeners');
    await page.locator('.menu-btn').click();
    await page.locator('.sidebar.open').waitFor();
    await page.waitForTimeout(300); // the slide-in transition
    await screenshot(page, '17-phone-menu');
    await page.keyboard.press('Escape');
    await page.locator('.sidebar.open').waitFor({ state: 'detached' });
    await page.setViewportSize({ width: 1280, height: 860 });
  });

  it('signs out', async () => {
    await page.locator('.sidebar button', { hasText: 'Sign out' }).click();
    await page.locator('form.login-form').waitFor();
    const status = await page.evaluate(async () => (await fetch('/api/v1/auth/me')).status);
    assert.equal(status, 401);
    assert.deepEqual(pageErrors, [], 'no script errors or CSP violations');
  });
});
