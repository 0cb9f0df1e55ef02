// The admin REST API (docs/API.md) as the UI uses it. Authentication rides on the HttpOnly
// session cookie set by /auth/login; the UI never sees or stores the token.

const BASE = '/api/v1';

/** An API failure in the API's one error shape: status, code, message, details[]. */
export class ApiError extends Error {
  constructor(status, code, message, details = [], retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
    this.retryAfter = retryAfter;
  }
}

/** Fired on window when any call answers 401: the session has ended. */
export const SIGNED_OUT_EVENT = 'iotgate:signed-out';

export async function request(method, path, body, { plainText = false } = {}) {
  const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json' } };
  if (plainText) {
    init.headers['Content-Type'] = 'text/plain; charset=utf-8';
    init.body = body;
  } else if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(BASE + path, init);
  } catch {
    throw new ApiError(0, 'network', 'Cannot reach the iotgate server. Check that it is running and try again.');
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const error = data?.error ?? {};
    const retryAfter = Number(response.headers.get('Retry-After')) || null;
    const failure = new ApiError(response.status, error.code ?? `http_${response.status}`,
      error.message ?? `The server answered ${response.status} ${response.statusText}.`, error.details ?? [], retryAfter);
    if (response.status === 401 && path !== '/auth/login') {
      window.dispatchEvent(new CustomEvent(SIGNED_OUT_EVENT));
    }
    throw failure;
  }
  return data;
}

export const api = {
  get: (path) => request('GET', path),
  post: (path, body) => request('POST', path, body ?? {}),
  /** POST of a text/plain body (a text message to devices). */
  postText: (path, text) => request('POST', path, text, { plainText: true }),
  put: (path, body) => request('PUT', path, body),
  patch: (path, body) => request('PATCH', path, body),
  delete: (path) => request('DELETE', path),
};

export const auth = {
  login: (userName, password) => request('POST', '/auth/login', { userName, password }),
  logout: () => request('POST', '/auth/logout', {}),
  me: () => request('GET', '/auth/me'),
};

const schemaCache = new Map();

/** The JSON Schema of a kind (listener, sentinel, route, downstream, device), fetched once. */
export function schema(name) {
  if (!schemaCache.has(name)) {
    const pending = api.get(`/schemas/${encodeURIComponent(name)}`);
    pending.catch(() => schemaCache.delete(name));
    schemaCache.set(name, pending);
  }
  return schemaCache.get(name);
}

/** The path segment of one definition. */
export function definitionPath(kind, key) {
  return `/${kind}/${encodeURIComponent(key)}`;
}
