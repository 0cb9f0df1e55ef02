// The admin UI in a real browser against the real binary: sign-in, pipeline set-up through the
// schema-generated forms, validation errors beside their fields, device registration, then a
// real device client (the Node.js example the UI shows) whose messages appear in the live view
// and, with a wrong key, in the dead letters. Screenshots go to artifacts/.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { launchBrowser, runNode, screenshot, startServer, writeArtifact } from './harness.mjs';

const PASSWORD = 'correct-horse-battery-staple';
const WAIT = 10_000;

describe('admin UI in Chromium', { timeout: 110_000 }, () => {
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

  it('shows each validation error beside its field', async () => {
    await nav('Listeners');
    await page.locator('.empty a', { hasText: 'Create a listener' }).click();
    await heading('New listener');
    // Anonymous is the default, so Basic credentials are not offered.
    assert.equal(await field('/userName').isVisible(), false);
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
    await page.locator('button[type=submit]').click();
    await heading('Plant A devices');
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
    // Counters come from the 2-second status poll: three received, two accepted, one rejected.
    await page.waitForFunction(() => /3 received\s*2 accepted · 1 rejected/.test(document.querySelector('tr[data-key="plant-a"]')?.innerText ?? ''), null, { timeout: WAIT });
    await screenshot(page, '13-listeners');
    await nav('Devices');
    await page.locator('tr[data-device-id="thermo-1"]').waitFor();
    await screenshot(page, '14-devices');
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
