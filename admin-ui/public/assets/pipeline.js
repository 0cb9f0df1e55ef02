// Sentinels, routes and downstreams: list, create and edit screens generated from their schemas.

import { definitionScreens } from './definitions.js';

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
  lead: 'Where routed messages go: the telemetry store, live WebSocket subscribers (such as the Live view) or a webhook.',
  formLead: 'A WebSocket downstream at /live feeds the Live view.',
  initial: { type: 'store', enabled: true },
  emptyTitle: 'No downstreams yet',
  emptyText: 'Create a telemetry store to keep messages, a WebSocket downstream to watch them live, or a webhook to forward them.',
});
