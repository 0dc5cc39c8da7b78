// The dashboard's JSON calls: same-origin, the session cookie sent by the browser, the
// session's CSRF token in a header on every state change. Errors arrive in the API's
// {"error": {...}} envelope.

let csrf = "";
export function setCsrf(token) { csrf = token; }

export class ApiError extends Error {
  constructor(message, status, code) { super(message); this.status = status; this.code = code; }
}

export async function api(path, { method = "GET", body, headers = {} } = {}) {
  const opts = { method, headers: { ...headers }, credentials: "same-origin", cache: "no-store" };
  if (method !== "GET") opts.headers["x-csrf-token"] = csrf;
  if (body !== undefined) {
    opts.headers["content-type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch("/dashboard/api" + path, opts);
  const data = await resp.json().catch(() => ({}));
  if (resp.status === 401 && data?.error?.code === "not_signed_in") {
    window.location.assign("/dashboard/"); // the sign-in page
  }
  if (!resp.ok) {
    throw new ApiError(data?.error?.message || resp.statusText, resp.status, data?.error?.code);
  }
  return data;
}
