// The service's public API as the page uses it: JSON calls with the API key, typed errors, and
// job events read from a fetch() stream (EventSource cannot send an Authorization header).

const KEY_STORAGE = "fewstep.apiKey";

export class ApiError extends Error {
  constructor(status, type, message, field = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.type = type;
    this.field = field;
    this.retryAfter = retryAfter;
  }
}

export class Api {
  constructor() {
    this.key = sessionStorage.getItem(KEY_STORAGE) || "";
  }

  setKey(key) {
    this.key = key;
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  }

  headers(extra = {}) {
    const headers = { ...extra };
    if (this.key) headers.Authorization = `Bearer ${this.key}`;
    return headers;
  }

  async call(method, path, body = undefined, { signal, keepalive } = {}) {
    const init = { method, headers: this.headers(), signal, keepalive };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "network", "the server cannot be reached (is fewstep serve running?)");
    }
    if (!response.ok) throw await errorFrom(response);
    return response.status === 204 ? null : response.json();
  }

  get(path, options) { return this.call("GET", path, undefined, options); }
  post(path, body, options) { return this.call("POST", path, body, options); }

  // Server-sent events of a job, as objects {event, ...data}; ends after a final event or
  // when the stream closes. `signal` aborts the stream.
  async *events(jobId, signal) {
    const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, {
      headers: this.headers({ Accept: "text/event-stream" }), signal, cache: "no-store",
    });
    if (!response.ok) throw await errorFrom(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const event = parseEvent(block);
          if (event) yield event;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // comment: keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  try {
    return { event: name, ...JSON.parse(data.join("\n")) };
  } catch {
    return null;
  }
}

async function errorFrom(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    // not JSON: described below by its status
  }
  const retryAfter = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  return new ApiError(
    response.status,
    error?.type || "http_error",
    error?.message || `the server answered ${response.status} ${response.statusText}`.trim(),
    error?.field ?? null,
    Number.isFinite(retryAfter) ? retryAfter : null,
  );
}
