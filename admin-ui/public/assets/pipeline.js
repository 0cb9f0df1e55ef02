// Sentinels, routes and downstreams: list, create and edit screens generated from their schemas.

import { api } from './api.js';
import { button, toast } from './dom.js';
import { definitionScreens } from './definitions.js';

/** Downstream types with a connection of their own, which the server can test. */
const CONNECTS_OUT = ['nats', 'mqtt', 'websocket-client'];

/**
 * "Test connection": POST /downstreams/{key}/test tries the saved definition once (connect,
 * authenticate, publish a probe) and answers what happened, step by step.
 */
function testConnectionButton(item) {
  if (!CONNECTS_OUT.includes(item.type)) return null;
  const control = button('Test connection', async () => {
    control.disabled = true;
    try {
      const report = await api.post(`/downstreams/${encodeURIComponent(item.key)}/test`, {});
      const steps = report.steps.map((s) => `${s.ok ? '✓' : '✗'} ${s.step}: ${s.detail}`).join(' · ');
      toast(`${item.key}: ${report.ok ? 'connected, authenticated, probe published' : 'test failed'}. ${steps}`,
        report.ok ? undefined : 'error');
    } catch (error) {
      toast(error.message, 'error');
    } finally {
      control.disabled = false;
    }
  }, { small: true });
  control.dataset.action = 'test-connection';
  return control;
}

export const sentinels = definitionScreens({
  kind: 'sentinels',
  schemaName: 'sentinel',
  singular: 'sentinel',
  title: 'Sentinels',
  lead: 'A sentinel identifies the sending device and checks its access key against the registry before a message goes further.',
  formLead: 'Anonymous listeners need a sentinel. The defaults read deviceId and accessKey from the JSON body.',
  initial: { method: 'accessKey', enabled: true },
  emptyTitle: 'No sentinels yet',
  emptyText: 'Create a sentinel, then choose it on an anonymous listener: it checks every device message against the device registry.',
});

export const routes = definitionScreens({
  kind: 'routes',
  schemaName: 'route',
  singular: 'route',
  title: 'Routes',
  lead: 'Routes send accepted messages to downstream modules. Every matching route delivers; a message that matches none becomes a dead letter.',
  formLead: 'Choose the downstreams, then narrow which messages go there. Empty selectors match everything.',
  initial: { enabled: true },
  emptyTitle: 'No routes yet',
  emptyText: 'Without a route, accepted messages become dead letters (unrouted). Create a downstream first, then a route to it.',
});

export const downstreams = definitionScreens({
  kind: 'downstreams',
  schemaName: 'downstream',
  singular: 'downstream',
  title: 'Downstreams',
  lead: 'Where routed messages go: the telemetry store, live WebSocket subscribers (such as the Live view), a webhook, NATS (JetStream), an MQTT broker or a remote WebSocket server.',
  rowExtras: testConnectionButton,
  formExtras: testConnectionButton,
  formLead: 'A WebSocket downstream at /live feeds the Live view.',
  initial: { type: 'store', enabled: true },
  emptyTitle: 'No downstreams yet',
  emptyText: 'Create a telemetry store to keep messages, a WebSocket downstream to watch them live, or a webhook to forward them.',
});
