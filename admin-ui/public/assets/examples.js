// Copy-paste device clients for a server-mode listener: a browser page, Node.js (the `ws`
// package) and Python (`websockets`). They follow the listener (URL, sub-protocol, origin, Basic
// credentials) and its sentinel (where the device id and access key go: body, query or header).

// A value in a generated message or header; each language renders it in its own syntax.
const DEVICE_ID = { symbol: 'DEVICE_ID' };
const ACCESS_KEY = { symbol: 'ACCESS_KEY' };
const DEVICE_B64 = { symbol: 'device-base64' }; // base64 of DEVICE_ID:ACCESS_KEY
const DEVICE_BASIC = { symbol: 'device-basic' }; // "Basic " + the above
const LISTENER_BASIC = { symbol: 'listener-basic' }; // "Basic " + base64 of USER_NAME:PASSWORD

const DEFAULT_LOCATORS = {
  deviceId: { from: 'body', pointer: '/deviceId' },
  accessKey: { from: 'body', pointer: '/accessKey' },
  credential: { from: 'header', name: 'authorization' },
};

/** Where each credential goes, from the listener and its sentinel. */
function plan(listener, sentinel) {
  const body = {};
  const query = [];
  const headers = [];
  const notes = [];
  const place = (locator, value) => {
    if (locator.from === 'body') setPointer(body, locator.pointer, value);
    else if (locator.from === 'query') query.push([locator.name, value]);
    else headers.push([locator.name, value]);
  };
  if (sentinel?.method === 'basic') {
    const locator = sentinel.credential ?? DEFAULT_LOCATORS.credential;
    place(locator, locator.from === 'header' ? DEVICE_BASIC : DEVICE_B64);
  } else if (sentinel) {
    place(sentinel.deviceId ?? DEFAULT_LOCATORS.deviceId, DEVICE_ID);
    place(sentinel.accessKey ?? DEFAULT_LOCATORS.accessKey, ACCESS_KEY);
  }
  if (listener.anonymous === false) {
    if (headers.some(([name]) => name.toLowerCase() === 'authorization')) {
      notes.push('The listener\'s Basic credentials and the sentinel\'s credential both use the Authorization header; only one can be sent.');
    } else {
      headers.push(['Authorization', LISTENER_BASIC]);
    }
  }
  if (listener.contentType === 'json') body.temperature = 21.5;
  return { body, query, headers, notes, basic: listener.anonymous === false };
}

function setPointer(target, pointer, value) {
  const tokens = pointer.split('/').slice(1).map((t) => t.replace(/~1/g, '/').replace(/~0/g, '~'));
  let node = target;
  tokens.forEach((token, i) => {
    if (i === tokens.length - 1) node[token] = value;
    else node = node[token] ??= {};
  });
}

const isIdentifier = (name) => /^[A-Za-z_$][A-Za-z0-9_$]*$/.test(name);

/** A JavaScript object literal with symbols rendered by `expr`. */
function jsLiteral(value, expr) {
  if (value && value.symbol) return expr(value);
  if (value && typeof value === 'object') {
    const parts = Object.entries(value).map(([k, v]) => `${isIdentifier(k) ? k : JSON.stringify(k)}: ${jsLiteral(v, expr)}`);
    return `{ ${parts.join(', ')} }`;
  }
  return JSON.stringify(value);
}

function pyLiteral(value, expr) {
  if (value && value.symbol) return expr(value);
  if (value && typeof value === 'object') {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pyLiteral(v, expr)}`).join(', ')}}`;
  }
  if (value === true) return 'True';
  if (value === false) return 'False';
  if (value === null) return 'None';
  return JSON.stringify(value);
}

function jsExpr(base64) {
  return (value) => ({
    DEVICE_ID: 'DEVICE_ID',
    ACCESS_KEY: 'ACCESS_KEY',
    'device-base64': base64('`${DEVICE_ID}:${ACCESS_KEY}`'),
    'device-basic': `"Basic " + ${base64('`${DEVICE_ID}:${ACCESS_KEY}`')}`,
    'listener-basic': `"Basic " + ${base64('`${USER_NAME}:${PASSWORD}`')}`,
  })[value.symbol];
}

const browserExpr = jsExpr((text) => `btoa(${text})`);
const nodeExpr = jsExpr((text) => `Buffer.from(${text}).toString("base64")`);
const pyExpr = (value) => ({
  DEVICE_ID: 'DEVICE_ID',
  ACCESS_KEY: 'ACCESS_KEY',
  'device-base64': 'base64.b64encode(f"{DEVICE_ID}:{ACCESS_KEY}".encode()).decode()',
  'device-basic': '"Basic " + base64.b64encode(f"{DEVICE_ID}:{ACCESS_KEY}".encode()).decode()',
  'listener-basic': '"Basic " + base64.b64encode(f"{USER_NAME}:{PASSWORD}".encode()).decode()',
})[value.symbol];

/** URL with credential query parameters: a JS template literal or a Python f-string. */
function jsUrl(url, query, expr) {
  if (query.length === 0) return JSON.stringify(url);
  const params = query.map(([name, value]) => `${encodeURIComponent(name)}=\${encodeURIComponent(${expr(value)})}`).join('&');
  return `\`${url}${url.includes('?') ? '&' : '?'}${params}\``;
}

function pyUrl(url, query) {
  if (query.length === 0) return JSON.stringify(url);
  const params = query.map(([name, value]) => `${encodeURIComponent(name)}={quote(${pyExpr(value)})}`).join('&');
  return `f"${url}${url.includes('?') ? '&' : '?'}${params}"`;
}

function constants(p, listener, { python = false } = {}) {
  const q = python ? '' : 'const ';
  const lines = [];
  if (p.usesDevice) {
    lines.push(`${q}DEVICE_ID = "thermo-1"${python ? '' : ';'}  ${python ? '#' : '//'} a device registered in iotgate`);
    lines.push(`${q}ACCESS_KEY = "paste the device's access key"${python ? '' : ';'}`);
  }
  if (p.basic) {
    lines.push(`${q}USER_NAME = ${JSON.stringify(listener.userName ?? 'listener user name')}${python ? '' : ';'}`);
    lines.push(`${q}PASSWORD = "listener password"${python ? '' : ';'}`);
  }
  return lines;
}

function messageJs(listener, p, expr) {
  if (listener.contentType === 'json') return `JSON.stringify(${jsLiteral(p.body, expr)})`;
  if (listener.contentType === 'text') return '"21.5"';
  return 'new Uint8Array([0x01, 0x02, 0x03])';
}

function messagePy(listener, p) {
  if (listener.contentType === 'json') return `json.dumps(${pyLiteral(p.body, pyExpr)})`;
  if (listener.contentType === 'text') return '"21.5"';
  return 'bytes([0x01, 0x02, 0x03])';
}

function usesDevice(p) {
  const all = [JSON.stringify(p.body), ...p.query.map(([, v]) => v.symbol), ...p.headers.map(([, v]) => v.symbol)].join(' ');
  return /DEVICE_ID|ACCESS_KEY|device-/.test(all);
}

/** One origin a client may send: the first allowed one, a wildcard filled in with `app.`. */
function exampleOrigin(listener) {
  const allowed = Array.isArray(listener.origin) ? listener.origin : (listener.origin ? [listener.origin] : []);
  const exact = allowed.find((o) => !o.includes('*'));
  return exact ?? (allowed[0] ? allowed[0].replace('*.', 'app.') : null);
}

export function clientExamples(listener, sentinel, url) {
  const origin = exampleOrigin(listener);
  const p = plan(listener, sentinel);
  p.usesDevice = usesDevice(p);
  const protocol = listener.subProtocol;
  const answerComment = 'Accepted messages get no answer; a rejected one is answered with {"error": {...}}.';

  // Browser: headers cannot be set on a WebSocket from a page.
  const browserHeaders = p.headers.length > 0;
  const browser = [
    ...constants(p, listener),
    ...(p.usesDevice || p.basic ? [''] : []),
    `const socket = new WebSocket(${jsUrl(url, p.query, browserExpr)}${protocol ? `, ${JSON.stringify(protocol)}` : ''});`,
    'socket.addEventListener("open", () => {',
    `  socket.send(${messageJs(listener, p, browserExpr)});`,
    '});',
    `// ${answerComment}`,
    'socket.addEventListener("message", (event) => console.log("iotgate:", event.data));',
    'socket.addEventListener("close", (event) => console.log("closed", event.code, event.reason));',
  ].join('\n');

  const nodeOptions = [];
  if (p.headers.length) {
    nodeOptions.push(`  headers: { ${p.headers.map(([name, value]) => `${isIdentifier(name) ? name : JSON.stringify(name)}: ${nodeExpr(value)}`).join(', ')} },`);
  }
  if (origin) nodeOptions.push(`  origin: ${JSON.stringify(origin)},`);
  const nodeArgs = [jsUrl(url, p.query, nodeExpr)];
  if (protocol) nodeArgs.push(JSON.stringify(protocol));
  const node = [
    '// npm install ws',
    'import WebSocket from "ws";',
    '',
    ...constants(p, listener),
    ...(p.usesDevice || p.basic ? [''] : []),
    nodeOptions.length
      ? `const socket = new WebSocket(${nodeArgs.join(', ')}, {\n${nodeOptions.join('\n')}\n});`
      : `const socket = new WebSocket(${nodeArgs.join(', ')});`,
    'socket.on("open", () => {',
    `  socket.send(${messageJs(listener, p, nodeExpr)});`,
    '  // Wait a second for an answer, then close.',
    '  setTimeout(() => socket.close(), 1000);',
    '});',
    `// ${answerComment}`,
    'socket.on("message", (data) => console.log("iotgate:", data.toString()));',
    'socket.on("close", (code) => console.log("closed", code));',
    'socket.on("error", (error) => console.error("error:", error.message));',
  ].join('\n');

  const pyImports = ['import asyncio'];
  if (p.headers.some(([, v]) => /basic|base64/.test(v.symbol)) || JSON.stringify(p.body).includes('base64')) pyImports.push('import base64');
  if (listener.contentType === 'json') pyImports.push('import json');
  if (p.query.length) pyImports.push('from urllib.parse import quote');
  const pyArgs = [`        ${pyUrl(url, p.query)},`];
  if (protocol) pyArgs.push(`        subprotocols=[${JSON.stringify(protocol)}],`);
  if (p.headers.length) pyArgs.push(`        additional_headers={${p.headers.map(([name, value]) => `${JSON.stringify(name)}: ${pyExpr(value)}`).join(', ')}},`);
  if (origin) pyArgs.push(`        origin=${JSON.stringify(origin)},`);
  const python = [
    '# pip install "websockets>=14"',
    ...pyImports,
    '',
    'import websockets',
    '',
    ...constants(p, listener, { python: true }),
    '',
    '',
    'async def main():',
    '    async with websockets.connect(',
    ...pyArgs,
    '    ) as ws:',
    `        await ws.send(${messagePy(listener, p)})`,
    `        # ${answerComment}`,
    '        try:',
    '            print("iotgate:", await asyncio.wait_for(ws.recv(), timeout=1))',
    '        except asyncio.TimeoutError:',
    '            print("sent")',
    '',
    '',
    'asyncio.run(main())',
  ].join('\n');

  const notes = p.notes.join(' ');
  return [
    {
      id: 'browser', label: 'Browser', file: 'JavaScript in a web page', code: browser,
      note: [browserHeaders ? 'Browsers cannot set headers on a WebSocket, so this listener needs a Node.js or Python client; the page below shows the message only.' : '',
        origin ? `The page must be served from an allowed origin, such as ${origin}.` : '', notes].filter(Boolean).join(' ') || null,
    },
    { id: 'node', label: 'Node.js', file: 'device.mjs', code: node, note: notes || null },
    { id: 'python', label: 'Python', file: 'device.py', code: python, note: notes || null },
  ];
}
