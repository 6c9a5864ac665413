// The HTTP API, as small async functions. The session cookie (HttpOnly) carries the auth.

const BASE = "/api/live-chat";
const UNSAFE = new Set(["POST", "PATCH", "PUT", "DELETE"]);

/** An API error with the server's code and message. */
export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message || `HTTP ${status}`);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

async function call(method, path, body) {
  const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body instanceof FormData) {
    init.body = body; // the browser writes the multipart boundary
  } else if (body !== undefined || UNSAFE.has(method)) {
    // The server takes browser writes only as JSON from its own page.
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body ?? {});
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "network", "The server cannot be reached");
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const err = (data && data.error) || {};
    const retry = Number(response.headers.get("Retry-After")) || null;
    throw new ApiError(response.status, err.code || "http_error", err.message, retry);
  }
  return data;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

const conv = (id) => `${BASE}/conversations/${encodeURIComponent(id)}`;

export const api = {
  /** Who is signed in ({kind, agent}); rejects with a 401 ApiError when nobody is. */
  me: () => call("GET", "/api/auth/me"),
  signIn: (email, password) => call("POST", "/api/auth/login", { email, password }),
  signOut: () => call("POST", "/api/auth/logout"),
  agents: () => call("GET", "/api/agents"),
  chats: ({ status, assignee, q, number, cursor, limit = 30 }) =>
    call("GET", `${BASE}/unified-chats${query({ limit, cursor, status, assignee, q, number })}`),
  search: ({ q, cursor, limit = 20 }) => call("GET", `${BASE}/search${query({ q, cursor, limit })}`),
  conversation: (id) => call("GET", conv(id)),
  messages: (id, { before, limit = 50 } = {}) =>
    call("GET", `${conv(id)}/messages${query({ limit, before })}`),
  /** Text (`{text, reply_to}`), a template (`{template}`) or a reaction (`{reaction}`). */
  send: (id, body) => call("POST", `${conv(id)}/messages`, typeof body === "string" ? { text: body } : body),
  /** A file with an optional caption, as a multipart form. */
  sendFile: (id, file, { caption, replyTo } = {}) => {
    const form = new FormData();
    if (caption) form.append("caption", caption);
    if (replyTo) form.append("reply_to", replyTo);
    form.append("file", file, file.name || "file");
    return call("POST", `${conv(id)}/messages`, form);
  },
  templates: () => call("GET", `${BASE}/templates`),
  numbers: () => call("GET", `${BASE}/numbers`),
  retry: (id, messageId) =>
    call("POST", `${conv(id)}/messages/${encodeURIComponent(messageId)}/retry`),
  markRead: (id) => call("POST", `${conv(id)}/read`),
  update: (id, changes) => call("PATCH", conv(id), changes),
};
