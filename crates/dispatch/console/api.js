// Calls to the dispatcher's API, with the bearer token kept in sessionStorage.

const TOKEN_KEY = "polaris-token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export function authHeaders() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

// An error answered by the API: its HTTP status and its documented error object.
export class ApiFailure extends Error {
  constructor(status, error, text) {
    super(error ? error.message : `HTTP ${status}: ${text.slice(0, 200)}`);
    this.status = status;
    this.error = error || null;
  }

  describe() {
    if (!this.error) return this.message;
    const e = this.error;
    const field = e.field ? ` (field ${e.field})` : "";
    return `${e.hex} ${e.name}${field}: ${e.message}`;
  }
}

// Reads a failed response into an ApiFailure.
export async function failure(response) {
  const text = await response.text();
  let error = null;
  try {
    error = JSON.parse(text).error || null;
  } catch (_) {
    // Not the documented shape (a proxy's page, say): the text is shown instead.
  }
  return new ApiFailure(response.status, error, text);
}

export async function api(method, path, body) {
  const headers = authHeaders();
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}
