// watchout-client.js: a browser client for Watchout (an ES module with no dependencies and no build step).
//
// One WatchoutClient is one WebSocket connection to /ws that stays up, plus the REST calls a dashboard
// makes. It behaves like the Python SDK (watchout/client.py, docs/sdk.md):
//  - reconnects after attempt n waits uniform(0, min(capMs, baseMs * 2^n)): exponential backoff with
//    full jitter, capped; the count starts again after a connection that got ready;
//  - on every connection it authenticates with `auth` (a browser cannot set Authorization on the
//    upgrade request), then subscribes again to each watched stream with sinceSeq = the last alert
//    seq it delivered, and drops any alert whose seq it has delivered already: every alert once, in order;
//  - `token` is a string or a provider (a function, sync or async, returning a token); it is called at
//    each connect after a 4401 and at 80% of the token's lifetime (from the server's `authenticated`
//    reply: the token itself is never decoded here);
//  - close 4401 reconnects once with a fresh token and, refused again, stops ("unauthorized");
//    4403, 4409 and 4410 stop at once. Everything else (1001 restart, 1006 network, 4413, 4429, ...)
//    reconnects after the backoff. `error` then says why it stopped, with closeCode and code.
// Binary video frames are decoded per docs/protocol.md ("Binary video frames"). See docs/guide-dashboard.md.

export const FATAL_CLOSES = Object.freeze({4401: "unauthorized", 4403: "forbidden", 4409: "replaced",
                                           4410: "stream-deleted"});
const REFRESH_AT = 0.8;          // refresh a token when this fraction of its remaining lifetime has passed
const MIN_REFRESH_MS = 1000;
const MAX_TIMER_MS = 2 ** 31 - 1;  // setTimeout fires at once past this (about 24.8 days)
const RESUBSCRIBE_MS = 7000;     // after `not-found`: under the server's 10 refused messages a minute
const PING_INTERVAL_MS = 20000;  // an application ping: a browser cannot see WebSocket pings, so a dead
const PING_TIMEOUT_MS = 10000;   // network is noticed by a missing `pong`
const MAGIC_W = 0x57, MAGIC_O = 0x4f, LAYOUT_VERSION = 1, HEADER_BYTES = 16;

/** Why the client stopped, or why a REST call failed: closeCode/reason of the close, code of the
 *  server's `error` (e.g. "token-expired"), status of an HTTP answer. */
export class WatchoutError extends Error {
  constructor(message, {closeCode = null, reason = "", code = null, status = null} = {}) {
    super(message);
    this.name = "WatchoutError";
    this.closeCode = closeCode;
    this.reason = reason;
    this.code = code;
    this.status = status;
  }

  /** A new token is needed: close 4401 twice, or HTTP 401. */
  get isUnauthorized() { return this.closeCode === 4401 || this.status === 401; }
}

/** Reconnect delays: attempt n (from 0) waits uniform(0, min(capMs, baseMs * 2^n)) milliseconds. */
export class Backoff {
  constructor({baseMs = 200, capMs = 10000, random = Math.random} = {}) {
    this.baseMs = baseMs;
    this.capMs = capMs;
    this.random = random;
  }

  delayMs(attempt) {
    return this.random() * Math.min(this.capMs, this.baseMs * 2 ** Math.min(attempt, 32));
  }
}

/** A binary video frame (an ArrayBuffer) -> {streamId, timestamp, width, height, jpeg: Uint8Array}.
 *  Layout, big-endian: "WO", version 1, L, timestamp (8), width (2), height (2), streamId (L), JPEG.
 *  Throws a TypeError for a malformed frame. */
export function decodeBinaryFrame(buffer) {
  const view = new DataView(buffer);
  if (view.byteLength < HEADER_BYTES + 2 || view.getUint8(0) !== MAGIC_W || view.getUint8(1) !== MAGIC_O ||
      view.getUint8(2) !== LAYOUT_VERSION) {
    throw new TypeError("not a Watchout binary frame (v1)");
  }
  const idLength = view.getUint8(3);
  if (idLength < 1 || view.byteLength <= HEADER_BYTES + idLength) throw new TypeError("truncated binary frame");
  const streamId = String.fromCharCode(...new Uint8Array(buffer, HEADER_BYTES, idLength));
  return {streamId, timestamp: Number(view.getBigUint64(4)), width: view.getUint16(12),
          height: view.getUint16(14), jpeg: new Uint8Array(buffer, HEADER_BYTES + idLength)};
}

/** The REST base of a WebSocket URL: ws://host:3000/ws -> http://host:3000. */
export function apiBase(wsUrl) {
  const url = new URL(wsUrl);
  url.protocol = url.protocol === "wss:" ? "https:" : "http:";
  url.pathname = url.pathname.replace(/\/ws$/, "");
  return url.origin + url.pathname.replace(/\/$/, "");
}

/** The WebSocket URL of the Watchout that serves `location` (the dashboard's own origin). */
export function sameOriginUrl(location = globalThis.location) {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
}

function base64ToBytes(data) {
  const text = atob(data);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i += 1) bytes[i] = text.charCodeAt(i);
  return bytes;
}

class Subscription {
  constructor(streamId, {video = true, alerts = true, binary = true, sinceSeq = null, epoch = null} = {}) {
    this.streamId = streamId;
    this.video = video;
    this.alerts = alerts;
    this.binary = binary;
    this.lastSeq = sinceSeq;   // the last alert seq delivered: the next subscribe's sinceSeq
    this.epoch = epoch;        // the history lastSeq belongs to: sent with sinceSeq, from `subscribed`
    this.status = null;        // online / streaming / offline, from `subscribed` and `status`
    this.lastReplay = null;    // the last replay-complete
    this.alertRepeats = 0;     // alerts dropped because their seq was delivered already
    this.ref = null;
    this.sinceSent = null;
    this.epochSent = null;
    this.accepting = false;    // alerts count only after the current subscribe's `subscribed`
    this.retry = null;
  }
}

export class WatchoutClient {
  /**
   * @param {object} options
   * @param {string} [options.url] ws(s)://host/ws; default: this page's origin
   * @param {string|function():(string|Promise<string>)} options.token a token or a token provider
   * @param {string} [options.apiUrl] REST base; default: derived from url
   * @param {Backoff} [options.backoff]
   */
  constructor({url = sameOriginUrl(), token, apiUrl = null, backoff = null, WebSocketImpl = globalThis.WebSocket,
               fetchImpl = null} = {}) {
    if (!token) throw new TypeError("a token or a token provider is needed");
    this.url = url;
    this.apiUrl = apiUrl || apiBase(url);
    this.backoff = backoff || new Backoff();
    this.state = "idle";          // idle, connecting, open, ready, waiting, closed
    this.error = null;            // a WatchoutError once it stopped for good
    this.principal = null;        // {sub, role, expiresAt} from the server's `authenticated` reply
    this.connects = 0;            // WebSocket connections that opened
    this.lastClose = null;        // {code, reason} of the last connection to close
    this.nextAttemptAt = null;    // while waiting: when the next attempt starts (ms since the epoch)
    this._source = token;
    this._token = typeof token === "string" ? token : null;
    this._WebSocket = WebSocketImpl;
    this._fetch = fetchImpl || ((...args) => globalThis.fetch(...args));
    this._ws = null;              // the open socket
    this._socket = null;          // the socket of the current attempt, open or not
    this._dropConnection = null;
    this._refreshTimer = null;
    this._session = 0;
    this._refs = 0;
    this._unauthorized = 0;       // 4401 closes since the last connection that got ready
    this._serverError = null;     // the last `error` of this connection (explains a close)
    this._subs = new Map();       // streamId -> Subscription
    this._listeners = new Map();  // event type -> Set of callbacks
    this._stopping = false;
    this._wake = null;
  }

  // ------------------------------------------------------------------ events
  /** Call `callback(detail)` for each event of `type`; returns a function that removes it.
   *  Types: state, authenticated, subscribed, alert, frame, status, replay-complete, history-reset,
   *  alert-acknowledged, server-error, token-expiring, closed, message (other server messages). */
  on(type, callback) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(callback);
    return () => this._listeners.get(type)?.delete(callback);
  }

  _emit(type, detail) {
    for (const callback of [...(this._listeners.get(type) || [])]) {
      try {
        callback(detail);
      } catch (err) {
        console.error(`watchout: a ${type} listener failed`, err);
      }
    }
  }

  // ------------------------------------------------------------------ lifecycle
  /** Start connecting in the background; returns at once. */
  start() {
    if (this.state === "idle") this._run();
    return this;
  }

  /** Stop for good: close the socket (1000) and cancel any retry. */
  close() {
    this._stopping = true;
    const ws = this._socket;
    if (ws && ws.readyState <= 1) ws.close(1000, "client closing");
    if (this._wake) this._wake();
    this._finish(null);
  }

  get isReady() { return this.state === "ready"; }

  /** Watch a stream's video and/or alerts; returns its Subscription (lastSeq, status, lastReplay).
   *  With sinceSeq null, alerts start at the stream's current lastSeq (read over REST), that is,
   *  only new ones; pass history()'s lastSeq and epoch to continue exactly after the history, or 0
   *  for all. If that history has ended (the stream was created again), "history-reset" comes first,
   *  then the current history from its first alert: drop what you showed of the old one. */
  watch(streamId, options = {}) {
    this.unwatch(streamId);
    const sub = new Subscription(streamId, options);
    this._subs.set(streamId, sub);
    if (this.isReady) this._startSubscription(sub);
    return sub;
  }

  /** Stop watching a stream (sends `unsubscribe` when connected). */
  unwatch(streamId) {
    const sub = this._subs.get(streamId);
    if (!sub) return;
    clearTimeout(sub.retry);
    this._subs.delete(streamId);
    if (this.isReady && sub.accepting) this.send({type: "unsubscribe", streamId});
  }

  subscription(streamId) { return this._subs.get(streamId) || null; }

  /** Send a JSON message now; false when not connected (nothing is queued). */
  send(message) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(message));
    return true;
  }

  // ------------------------------------------------------------------ REST (same origin, Bearer token)
  /** Call the REST API; the parsed JSON (null for an empty body). Throws WatchoutError with the HTTP
   *  status and the server's error code (401: a new token is needed). */
  async api(path, {method = "GET", query = null, body = undefined, as = "json"} = {}) {
    const token = await this._getToken(false);
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(query || {})) {
      if (value !== null && value !== undefined) params.set(key, String(value));
    }
    const headers = {Authorization: `Bearer ${token}`};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      const search = params.toString();
      response = await this._fetch(this.apiUrl + path + (search ? `?${search}` : ""),
                                   {method, headers, cache: "no-store", credentials: "omit",
                                    body: body === undefined ? undefined : JSON.stringify(body)});
    } catch (err) {
      throw new WatchoutError(`${method} ${path}: ${err.message || "network error"}`);
    }
    if (!response.ok) {
      let error = {};
      try { error = (await response.json()).error || {}; } catch { /* not JSON: keep the status */ }
      throw new WatchoutError(`${method} ${path}: HTTP ${response.status} ${error.message || ""}`.trim(),
                              {status: response.status, code: error.code || null});
    }
    if (as === "blob") return response.blob();
    const text = await response.text();
    return text ? JSON.parse(text) : null;
  }

  /** GET /api/streams: the caller's streams (an admin's: all). */
  streams(query = {}) { return this.api("/api/streams", {query: {limit: 100, ...query}}); }

  /** GET /api/streams/{id}: one stream with its live figures. */
  stream(streamId) { return this.api(`/api/streams/${encodeURIComponent(streamId)}`); }

  /** One page of GET /api/streams/{id}/alerts: {items (newest first), nextCursor, lastSeq, epoch}. Every
   *  page after the first is pinned to the first page's lastSeq; watch(id, {sinceSeq: lastSeq, epoch})
   *  continues it. */
  history(streamId, {limit = 100, cursor = null, ...filters} = {}) {
    return this.api(`/api/streams/${encodeURIComponent(streamId)}/alerts`, {query: {limit, cursor, ...filters}});
  }

  /** POST /api/alerts/{id}/ack: the alert, acknowledged (the first acknowledgement is kept). The stream's
   *  watchers, this one included, also get `alert-acknowledged`. */
  acknowledge(alertId) { return this.api(`/api/alerts/${encodeURIComponent(alertId)}/ack`, {method: "POST"}); }

  /** Who got an alert: {items: [{destinationId, channel, purpose, state, attempts, deliveredAt, lastError, ...}]}. */
  deliveries(alertId) { return this.api(`/api/alerts/${encodeURIComponent(alertId)}/deliveries`); }

  /** GET /api/alerts/{id}/snapshot.jpg as a Blob (show it through URL.createObjectURL, then revoke). */
  snapshot(alertId) {
    return this.api(`/api/alerts/${encodeURIComponent(alertId)}/snapshot.jpg`, {as: "blob"});
  }

  // ------------------------------------------------------------------ the connection loop
  async _getToken(fresh) {
    if (typeof this._source === "string") return this._source;
    if (this._token === null || fresh) {
      const value = await this._source();
      if (typeof value !== "string" || !value) throw new WatchoutError("the token provider returned no token");
      this._token = value;
    }
    return this._token;
  }

  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    this._emit("state", state);
  }

  async _run() {
    let failures = 0;  // attempts since the last connection that got ready
    while (!this._stopping) {
      this._setState("connecting");
      const {wasReady, error} = await this._connectOnce();
      if (error) {
        this._finish(error);
        return;
      }
      if (this._stopping) break;
      if (wasReady) failures = 0;
      const delay = this.backoff.delayMs(failures);
      this.nextAttemptAt = Date.now() + delay;
      this._setState("waiting");
      await this._sleep(delay);
      this.nextAttemptAt = null;
      failures += 1;
    }
    this._finish(null);
  }

  /** Wait `ms`, or less if close() wakes it. */
  _sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(() => this._wake(), ms);
      this._wake = () => {
        clearTimeout(timer);
        this._wake = null;
        resolve();
      };
    });
  }

  /** One connection, from open to close: {wasReady, error (fatal, or null to reconnect)}. */
  async _connectOnce() {
    let token;
    try {
      token = await this._getToken(this._unauthorized > 0);
    } catch (err) {
      console.warn("watchout: the token provider failed", err);
      return {wasReady: false, error: null};
    }
    let ws;
    try {
      ws = new this._WebSocket(this.url);
    } catch (err) {  // a malformed URL: retrying cannot help
      return {wasReady: false, error: new WatchoutError(`cannot open ${this.url}: ${err.message}`)};
    }
    ws.binaryType = "arraybuffer";
    this._socket = ws;
    this._serverError = null;
    const session = ++this._session;
    let wasReady = false;
    const closed = await new Promise((resolve) => {
      let pinger = null, pongDue = null;
      const finish = (code, reason) => {
        clearInterval(pinger);
        clearTimeout(pongDue);
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        resolve({code, reason});
      };
      this._dropConnection = () => {  // no pong: the network is gone; don't wait for a close handshake
        ws.close();
        finish(1006, "no pong from the server");
      };
      ws.onopen = () => {
        if (this._stopping) {
          ws.close(1000, "client closing");
          return;
        }
        this.connects += 1;
        this._ws = ws;
        this._setState("open");
        this.send({type: "auth", token, id: `auth-${session}`});
        pinger = setInterval(() => {
          if (this.send({type: "ping", id: "keepalive"}) && pongDue === null) {
            pongDue = setTimeout(() => this._dropConnection(), PING_TIMEOUT_MS);
          }
        }, PING_INTERVAL_MS);
      };
      ws.onmessage = (event) => {
        clearTimeout(pongDue);  // any message shows that the connection is alive
        pongDue = null;
        this._onRaw(event.data, session);
        if (this.state === "ready") wasReady = true;
      };
      ws.onclose = (event) => finish(event.code || 1006, event.reason || "");
      ws.onerror = () => { /* onclose follows with the code */ };
    });
    if (this.state === "ready") wasReady = true;
    this._ws = null;
    this._socket = null;
    this._dropConnection = null;
    clearTimeout(this._refreshTimer);
    for (const sub of this._subs.values()) {
      clearTimeout(sub.retry);
      sub.accepting = false;
    }
    this.lastClose = closed;
    return {wasReady, error: this._fatal(closed.code, closed.reason)};
  }

  _fatal(code, reason) {
    if (this._stopping) return null;
    const serverError = this._serverError;
    const detail = `closed ${code} ${reason}`.trim() +
      (serverError ? ` (${serverError.code}: ${serverError.message})` : "");
    const options = {closeCode: code, reason, code: serverError ? serverError.code : FATAL_CLOSES[code] || null};
    if (code === 4401) {
      this._unauthorized += 1;
      // The retry has a fresh token from the provider (or the same fixed one): refused again, stop.
      return this._unauthorized >= 2 ? new WatchoutError(detail, options) : null;
    }
    return FATAL_CLOSES[code] ? new WatchoutError(detail, options) : null;
  }

  _finish(error) {
    if (this.state === "closed") return;
    this._stopping = true;
    this.error = error;
    clearTimeout(this._refreshTimer);
    for (const sub of this._subs.values()) clearTimeout(sub.retry);
    this._setState("closed");
    this._emit("closed", error);
    if (error) console.warn("watchout: connection closed for good:", error.message);
  }

  // ------------------------------------------------------------------ messages
  _onRaw(data, session) {
    if (session !== this._session) return;
    if (typeof data !== "string") {
      this._onBinary(data);
      return;
    }
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      console.warn("watchout: unreadable message from the server");
      return;
    }
    if (!message || typeof message.type !== "string") return;
    try {
      this._onMessage(message, session);
    } catch (err) {
      console.error(`watchout: handling a ${message.type} message failed`, err);
    }
  }

  _onBinary(buffer) {
    let frame;
    try {
      frame = decodeBinaryFrame(buffer);
    } catch (err) {
      console.warn("watchout:", err.message);
      return;
    }
    const sub = this._subs.get(frame.streamId);
    if (!sub || !sub.video) return;
    this._emit("frame", {streamId: frame.streamId, timestamp: frame.timestamp, width: frame.width,
                         height: frame.height, jpeg: new Blob([frame.jpeg], {type: "image/jpeg"})});
  }

  _onMessage(m, session) {
    const sub = typeof m.streamId === "string" ? this._subs.get(m.streamId) : undefined;
    switch (m.type) {
      case "authenticated":
        this.principal = {sub: m.sub, role: m.role, expiresAt: m.expiresAt};
        if (m.ref === `auth-${session}`) this._ready(session);
        this._scheduleRefresh(session);
        this._emit("authenticated", this.principal);
        return;
      case "subscribed":
        if (sub && m.ref === sub.ref) {
          sub.accepting = true;
          sub.status = m.status;
          if (m.reset && sub.alerts) {
            // our position was in another history of this stream id (deleted and created again, or a new
            // database): the replay that follows starts the current one from its first alert
            sub.lastSeq = 0;
            this._emit("history-reset", {streamId: sub.streamId, epoch: m.epoch});
          }
          if (typeof m.epoch === "string") sub.epoch = m.epoch;
          this._emit("subscribed", m);
          this._emit("status", {streamId: m.streamId, status: m.status, timestamp: Date.now()});
        }
        return;
      case "alert":
        if (!sub || !sub.alerts || !sub.accepting) return;  // before `subscribed`: the new subscribe replays it
        if (sub.lastSeq !== null && m.seq <= sub.lastSeq) {
          sub.alertRepeats += 1;
          return;
        }
        sub.lastSeq = m.seq;
        if (sub.epoch !== null) m.epoch = sub.epoch;  // (epoch, seq) names an alert across histories
        this._emit("alert", m);
        return;
      case "video-frame":
        if (sub && sub.video) {
          this._emit("frame", {streamId: m.streamId, timestamp: m.timestamp, width: m.width || 0,
                               height: m.height || 0, jpeg: new Blob([base64ToBytes(m.data)], {type: "image/jpeg"})});
        }
        return;
      case "status":
        if (sub) sub.status = m.status;
        this._emit("status", m);
        return;
      case "replay-complete":
        if (!sub) return;
        sub.lastReplay = m;
        this._emit("replay-complete", m);
        if (!m.complete && !m.reset && m.lastSeq === sub.sinceSent && sub.sinceSent && sub.epochSent === null) {
          // a position sent without its epoch, beyond the history's end: from an older history of the
          // stream id; take the current one from its start.
          sub.lastSeq = 0;
          this._emit("history-reset", {streamId: sub.streamId});
          this._subscribe(sub);
        }
        return;
      case "alert-acknowledged":
        this._emit("alert-acknowledged", m);
        return;
      case "error":
        this._onServerError(m);
        return;
      default:
        this._emit("message", m);  // pong, unsubscribed, and types added later
    }
  }

  _onServerError(m) {
    this._serverError = m;
    const sub = [...this._subs.values()].find((s) => (m.ref && s.ref === m.ref) ||
                                                     (!m.ref && m.streamId === s.streamId));
    if (sub && m.code === "not-found") {  // not created yet, or no longer in the token's scope
      sub.accepting = false;
      sub.status = null;
      const session = this._session;
      clearTimeout(sub.retry);
      sub.retry = setTimeout(() => {
        if (this._session === session && this._subs.get(sub.streamId) === sub && this.isReady) this._subscribe(sub);
      }, RESUBSCRIBE_MS);
    }
    this._emit("server-error", m);
  }

  _ready(session) {
    if (this.state !== "open" || session !== this._session) return;
    this._unauthorized = 0;
    this._setState("ready");
    for (const sub of this._subs.values()) this._startSubscription(sub);
  }

  async _startSubscription(sub) {
    const session = this._session;
    if (sub.alerts && sub.lastSeq === null) {
      [sub.lastSeq, sub.epoch] = await this._readPosition(sub.streamId);
      if (session !== this._session || !this.isReady || this._subs.get(sub.streamId) !== sub) return;
    }
    this._subscribe(sub);
  }

  /** [lastSeq, epoch] of the stream's history now, over REST; [0, null] for a stream not created yet. */
  async _readPosition(streamId) {
    try {
      const page = await this.history(streamId, {limit: 1});
      return [page.lastSeq, page.epoch ?? null];
    } catch (err) {
      if (err.status === 404) return [0, null];  // not created yet: all of its alerts will be new
      console.info(`watchout: no lastSeq for ${streamId} (${err.message}): live alerts only`);
      return [null, null];
    }
  }

  _subscribe(sub) {
    clearTimeout(sub.retry);
    this._refs += 1;
    sub.ref = `s${this._refs}`;
    sub.accepting = false;
    const consumes = [...(sub.video ? ["video-frame"] : []), ...(sub.alerts ? ["alert"] : [])];
    const message = {type: "subscribe", clientType: "dashboard", streamId: sub.streamId, consumes,
                     format: sub.binary ? "binary" : "json", id: sub.ref};
    sub.sinceSent = sub.alerts ? sub.lastSeq : null;
    sub.epochSent = sub.sinceSent !== null ? sub.epoch : null;
    if (sub.sinceSent !== null) {
      message.sinceSeq = sub.sinceSent;
      if (sub.epochSent !== null) message.epoch = sub.epochSent;
    }
    this.send(message);
  }

  /** At 80% of the token's remaining lifetime (from `authenticated`), send `auth` with a fresh token
   *  from the provider; with nothing fresh to send, emit token-expiring instead. */
  _scheduleRefresh(session) {
    clearTimeout(this._refreshTimer);
    if (!this.principal || typeof this.principal.expiresAt !== "number") return;
    const due = Date.now() + Math.max(MIN_REFRESH_MS, REFRESH_AT * (this.principal.expiresAt - Date.now()));
    const wait = () => {
      this._refreshTimer = setTimeout(refresh, Math.min(MAX_TIMER_MS, Math.max(0, due - Date.now())));
    };
    const refresh = async () => {
      if (session !== this._session || !this._ws) return;
      if (Date.now() < due) {  // a timer capped at MAX_TIMER_MS
        wait();
        return;
      }
      const previous = this._token;
      let token;
      try {
        token = await this._getToken(typeof this._source !== "string");
      } catch (err) {  // the page's provider: try again shortly
        console.warn("watchout: the token provider failed", err);
        this._refreshTimer = setTimeout(refresh, MIN_REFRESH_MS);
        return;
      }
      if (token === previous || typeof this._source === "string") {
        // Nothing new to send: the server closes with 4401 at expiry. Let the page ask for a new token.
        this._emit("token-expiring", {expiresAt: this.principal.expiresAt});
        return;
      }
      this.send({type: "auth", token, id: `refresh-${session}`});  // `authenticated` schedules the next one
    };
    wait();
  }
}
