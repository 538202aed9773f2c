// app.js: the Watchout dashboard page. Streams (polled), a live view (binary frames onto a canvas) and the
// alert panel (REST history, then live from sinceSeq) over one WatchoutClient (./watchout-client.js), and the
// Notifications toggle (Web Push through the service worker ./sw.js).
// Everything that came from a server or an ML service is shown with textContent, never as markup.

import {WatchoutClient} from "./watchout-client.js";

const TOKEN_KEY = "watchout.token";    // sessionStorage: this tab only, never a URL or localStorage
const STREAM_KEY = "watchout.stream";
// The list and its live figures (fps, watchers, last frame) are polled: GET /api/streams every
// STREAMS_POLL_MS. The watched stream's status also arrives at once over the WebSocket (`status`).
const STREAMS_POLL_MS = 5000;
const HISTORY_PAGE = 50;
const MAX_ALERTS = 500;                // shown at most; the oldest go first (and free their snapshots)
const SNAPSHOT_FETCHES = 4;            // snapshots fetched at a time
const PUSH_FORGET_MS = 3000;           // at sign-out, how long the server is given to forget this browser

const $ = (id) => document.getElementById(id);

function el(tag, {className = "", text = null, attrs = {}} = {}, children = []) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== null) node.textContent = text;
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

const page = {
  client: null,
  signedIn: false,
  principal: null,
  streams: new Map(),     // streamId -> {resource, live, li}
  selected: null,
  selection: 0,           // bumps at each stream change: late answers for an older choice are dropped
  olderCursor: null,
  pollTimer: null,
  alerts: new Map(),      // seq -> {alert, li, thumbUrl}
  alertIds: new Map(),    // alertId -> seq
  snapshotQueue: [],
  snapshotsLoading: 0,
  focusAlert: null,       // an alertId to bring into view once shown (a notification's link)
};

// ---------------------------------------------------------------------------- the token
// A link may carry the token in its fragment (#token=...&stream=...): browsers never send the fragment to a
// server, so it stays out of access logs. Move it to sessionStorage and off the address bar at once.
function takeTokenFromFragment() {
  if (!location.hash) return;
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("token")) sessionStorage.setItem(TOKEN_KEY, params.get("token").trim());
  if (params.get("stream")) sessionStorage.setItem(STREAM_KEY, params.get("stream").trim());
  if (params.get("alert")) page.focusAlert = params.get("alert");
  history.replaceState(null, "", location.pathname + location.search);
}

function storedToken() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) throw new Error("signed out");
  return token;
}

function showSignIn(message) {
  $("main").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-message").textContent = message || "";
  $("principal").textContent = "";
  setConnection("signed-out", "Signed out");
  $("token-input").focus();
}

async function signIn() {
  page.signedIn = true;
  $("sign-in").hidden = true;
  setConnection("connecting", "Signing in…");
  const probe = new WatchoutClient({token: storedToken});
  try {
    await probe.streams({limit: 1});  // a refused token is a clear message, not a reconnect loop
  } catch (err) {
    if (err.isUnauthorized) {
      signOut(`This token was refused (${err.code || `HTTP ${err.status}`}). Sign in again with a valid token.`);
      return;
    }
    showBanner(`Cannot reach Watchout yet (${err.message}); retrying.`);
  }
  if (!page.signedIn) return;
  $("main").hidden = false;
  $("sign-out").hidden = false;
  $("notifications").hidden = false;
  connect();
  showPushState();
  await pollStreams();
}

function signOut(message = "") {
  page.signedIn = false;
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(page.pollTimer);
  const client = page.client;
  page.client = null;
  if (client) client.close();
  selectStream(null);
  page.streams.clear();
  $("streams").replaceChildren();
  $("notifications").hidden = true;
  setPushMessage("");
  hideBanner();
  showSignIn(message);
}

// ---------------------------------------------------------------------------- the connection
function connect() {
  const client = new WatchoutClient({token: storedToken});
  page.client = client;
  const mine = (fn) => (detail) => { if (page.client === client) fn(detail); };
  client.on("state", mine(() => renderConnection()));
  client.on("authenticated", mine(showPrincipal));
  client.on("frame", mine(onFrame));
  client.on("alert", mine((alert) => addAlert(alert)));
  client.on("alert-acknowledged", mine((m) => markAcknowledged(m.alertId, m.acknowledged)));
  client.on("status", mine(onStatus));
  client.on("subscribed", mine(() => setAlertsState()));
  client.on("replay-complete", mine(onReplayComplete));
  client.on("history-reset", mine(onHistoryReset));
  client.on("server-error", mine(onServerError));
  client.on("token-expiring", mine(({expiresAt}) => showBanner(
    `Your token expires at ${new Date(expiresAt).toLocaleTimeString()}. Sign out and in again with a new token ` +
    "to stay connected.", true)));
  client.on("closed", mine(onClosed));
  client.start();
}

function onClosed(error) {
  if (!error) return;
  if (error.isUnauthorized) {
    signOut(`Your token was refused or has expired (${error.code || error.closeCode}). Sign in again.`);
  } else if (error.closeCode === 4410) {
    markDeleted(page.selected);
    connect();  // the deletion closed the whole connection: open a new one for the other streams
  } else {
    showBanner(`Disconnected for good: ${error.message}. Reload the page to try again.`, true);
  }
}

function renderConnection() {
  const client = page.client;
  if (!client) return;
  const state = client.state;
  let text = {idle: "Not connected", connecting: "Connecting…", open: "Connecting…", ready: "Live",
              closed: "Disconnected"}[state];
  if (state === "waiting") {
    const seconds = Math.max(0, Math.ceil((client.nextAttemptAt - Date.now()) / 1000));
    const close = client.lastClose ? ` (${client.lastClose.code}${client.lastClose.reason ? ` ${client.lastClose.reason}` : ""})` : "";
    text = `Connection lost${close}. Reconnecting${seconds ? ` in ${seconds} s` : ""}…`;
  }
  setConnection(state, text);
  setAlertsState();
}

function setConnection(state, text) {
  const node = $("connection");
  node.dataset.state = state;
  node.textContent = text;
}

function showPrincipal(principal) {
  page.principal = principal;
  $("principal").textContent = `${principal.sub} (${principal.role})`;
  renderStreams();
}

/** A message above the panels; a sticky one stays until sign-out, others until the next successful poll. */
function showBanner(text, sticky = false) {
  $("banner").textContent = text;
  $("banner").dataset.kind = sticky ? "sticky" : "transient";
  $("banner").hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
  $("banner").textContent = "";
  $("banner").dataset.kind = "";
}

// ---------------------------------------------------------------------------- streams
async function pollStreams() {
  clearTimeout(page.pollTimer);
  const client = page.client;
  if (!client || !page.signedIn) return;
  try {
    const list = await client.streams();  // each item carries this node's live figures
    if (client !== page.client) return;
    const seen = new Set();
    for (const resource of list.items) {
      seen.add(resource.streamId);
      const entry = page.streams.get(resource.streamId) || {};
      page.streams.set(resource.streamId, {...entry, resource, live: resource.live || null, deleted: false});
    }
    for (const streamId of [...page.streams.keys()]) {
      if (seen.has(streamId)) continue;
      if (streamId === page.selected) markDeleted(streamId);  // kept in the list while it is on screen
      else page.streams.delete(streamId);
    }
    renderStreams();
    if ($("banner").dataset.kind !== "sticky") hideBanner();
    if (!page.selected) {
      const wanted = sessionStorage.getItem(STREAM_KEY);
      const first = wanted && page.streams.has(wanted) ? wanted : list.items[0]?.streamId;
      if (first) selectStream(first);
    }
  } catch (err) {
    if (client !== page.client) return;
    if (err.isUnauthorized) {
      signOut(`Your token was refused or has expired (${err.code || err.status}). Sign in again.`);
      return;
    }
    showBanner(`Cannot load the streams (${err.message}); retrying.`);
  }
  page.pollTimer = setTimeout(pollStreams, STREAMS_POLL_MS);
}

function renderStreams() {
  const list = $("streams");
  const admin = page.principal?.role === "admin";
  const items = [...page.streams.values()];
  $("streams-empty").hidden = items.length > 0;
  const nodes = items.map(({resource, live, deleted}) => {
    const status = deleted ? "deleted" : resource.status;
    const figures = [];
    if (live && live.producerConnected && (status === "online" || status === "streaming")) {
      figures.push(`${live.fps.toFixed(1)} fps`, `${live.consumers} watching`);
    }
    figures.push(resource.lastSeq ? `last alert #${resource.lastSeq}` : "no alerts");
    if (admin || (page.principal && resource.ownerId !== page.principal.sub)) figures.push(`owner ${resource.ownerId}`);
    const button = el("button", {className: "stream", attrs: {type: "button", "data-stream-id": resource.streamId}}, [
      el("span", {className: `dot ${status}`, attrs: {"aria-hidden": "true"}}),
      el("span", {className: "stream-name", text: resource.name || resource.streamId}),
      el("span", {className: "stream-status", text: status}),
      el("span", {className: "stream-figures", text: figures.join(" · ")}),
    ]);
    button.addEventListener("click", () => selectStream(resource.streamId));
    const li = el("li", {attrs: {"data-stream-id": resource.streamId, "data-status": status}}, [button]);
    if (resource.streamId === page.selected) li.classList.add("selected");
    return li;
  });
  list.replaceChildren(...nodes);
}

function onStatus({streamId, status}) {
  const entry = page.streams.get(streamId);
  if (entry && !entry.deleted) {
    entry.resource = {...entry.resource, status};
    renderStreams();
  }
  if (streamId === page.selected) setViewStatus(status);
}

function markDeleted(streamId) {
  if (!streamId) return;
  const entry = page.streams.get(streamId);
  if (entry) entry.deleted = true;
  renderStreams();
  if (streamId === page.selected) {
    page.client?.unwatch(streamId);
    setViewStatus("deleted");
    $("alerts-state").textContent = "This stream was deleted, with its alerts.";
  }
}

// ---------------------------------------------------------------------------- choosing a stream
async function selectStream(streamId) {
  if (streamId === page.selected) return;
  const client = page.client;
  if (page.selected && client) client.unwatch(page.selected);
  page.selected = streamId;
  page.selection += 1;
  const selection = page.selection;
  clearAlerts();
  resetVideo();
  renderStreams();
  $("older").hidden = true;
  if (!streamId || !client) {
    $("view-title").textContent = "Live view";
    setViewStatus("");
    $("alerts-state").textContent = "Pick a stream to see its alerts.";
    return;
  }
  sessionStorage.setItem(STREAM_KEY, streamId);
  const entry = page.streams.get(streamId);
  $("view-title").textContent = entry?.resource.name || streamId;
  setViewStatus(entry?.resource.status || "");
  $("alerts-state").textContent = "Loading the alert history…";
  let sinceSeq = null, epoch = null;  // null: the client then starts from the stream's lastSeq itself
  try {
    // History first, then live from its lastSeq: the server replays what arrived in between, so
    // nothing is missed or shown twice.
    const history = await client.history(streamId, {limit: HISTORY_PAGE});
    if (selection !== page.selection) return;
    history.items.forEach((alert) => addAlert(alert));
    page.olderCursor = history.nextCursor;
    $("older").hidden = !history.nextCursor;
    sinceSeq = history.lastSeq;
    epoch = history.epoch ?? null;
  } catch (err) {
    if (selection !== page.selection) return;
    if (err.isUnauthorized) {
      signOut(`Your token was refused or has expired (${err.code || err.status}). Sign in again.`);
      return;
    }
    if (err.status === 404) sinceSeq = 0;  // not created yet (or not visible): every alert will be new
    $("alerts-state").textContent = `Cannot load the history: ${err.message}`;
  }
  if (page.client === client && client) client.watch(streamId, {sinceSeq, epoch});
  setAlertsState();
}

async function loadOlder() {
  const client = page.client, streamId = page.selected, selection = page.selection;
  if (!client || !streamId || !page.olderCursor) return;
  $("older").disabled = true;
  try {
    const history = await client.history(streamId, {limit: HISTORY_PAGE, cursor: page.olderCursor});
    if (selection !== page.selection) return;
    history.items.forEach((alert) => addAlert(alert));
    page.olderCursor = history.nextCursor;
    $("older").hidden = !history.nextCursor;
  } catch (err) {
    $("alerts-state").textContent = `Cannot load older alerts: ${err.message}`;
  } finally {
    $("older").disabled = false;
  }
}

function setViewStatus(status) {
  const text = {online: "Online: the phone is connected, waiting for frames.", streaming: "Streaming",
                offline: "Offline: no phone is connected.", deleted: "This stream was deleted.",
                "not-found": "Not found, or this token may not see it; trying again…", "": ""}[status];
  $("view-status").textContent = text === undefined ? status : text;
  $("view-status").dataset.status = status;
}

function onServerError(m) {
  const sub = page.selected && page.client?.subscription(page.selected);
  if (m.code === "not-found" && sub && (m.ref === sub.ref || m.streamId === page.selected)) {
    setViewStatus("not-found");
  } else {
    console.warn("watchout:", m.code, m.message);
  }
}

// ---------------------------------------------------------------------------- video
const video = {pending: null, drawing: false, drawn: 0, times: [], last: null};

function onFrame(frame) {
  if (frame.streamId !== page.selected) return;
  // Decode only the newest frame: one that arrives while the previous is being drawn replaces it, so a slow
  // device shows fewer frames, never older ones.
  video.pending = frame;
  if (!video.drawing) drawFrames();
}

async function drawFrames() {
  video.drawing = true;
  while (video.pending) {
    const frame = video.pending;
    video.pending = null;
    let bitmap;
    try {
      bitmap = await createImageBitmap(frame.jpeg);
    } catch {
      continue;  // not a decodable JPEG: skip it
    }
    if (frame.streamId === page.selected) {
      const canvas = $("video");
      if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
        canvas.width = bitmap.width;
        canvas.height = bitmap.height;
      }
      canvas.getContext("2d").drawImage(bitmap, 0, 0);
      video.drawn += 1;
      video.times.push(performance.now());
      video.last = frame;
      canvas.dataset.frames = String(video.drawn);
      showFps();
    }
    bitmap.close();
  }
  video.drawing = false;
}

function resetVideo() {
  video.pending = null;
  video.drawn = 0;
  video.times = [];
  video.last = null;
  const canvas = $("video");
  canvas.dataset.frames = "0";
  const context = canvas.getContext("2d");
  context.fillStyle = "#10161d";
  context.fillRect(0, 0, canvas.width, canvas.height);
  showFps();
}

function showFps() {
  const now = performance.now();
  video.times = video.times.filter((t) => now - t < 2000);
  const fps = video.times.filter((t) => now - t < 1000).length;
  $("fps").textContent = `${fps} fps`;
  $("fps").dataset.fps = String(fps);
  const last = video.last;
  $("frame-info").textContent = last
    ? `· ${last.width || $("video").width}×${last.height || $("video").height} · ${video.drawn} frames shown · ` +
      `last at ${new Date(last.timestamp).toLocaleTimeString()}`
    : "";
}

// ---------------------------------------------------------------------------- alerts
function toDate(value) { return value === null || value === undefined ? null : new Date(value); }

/** A REST history item or a WebSocket `alert`, in one shape. */
function normalize(raw) {
  return {alertId: raw.alertId, streamId: raw.streamId, seq: raw.seq, severity: raw.severity,
          message: raw.message, metadata: raw.metadata || {}, timestamp: raw.timestamp,
          receivedAt: toDate(raw.receivedAt), hasSnapshot: Boolean(raw.hasSnapshot || raw.snapshotUrl),
          acknowledged: raw.acknowledged ? {by: raw.acknowledged.by, at: toDate(raw.acknowledged.at)} : null};
}

function addAlert(raw) {
  const alert = normalize(raw);
  if (alert.streamId !== page.selected || !Number.isInteger(alert.seq)) return;
  const known = page.alerts.get(alert.seq);
  if (known) {  // the same alert again (history overlapping a page): keep one
    if (alert.acknowledged) markAcknowledged(alert.alertId, alert.acknowledged);
    return;
  }
  const li = renderAlert(alert);
  const entry = {alert, li, thumbUrl: null};
  page.alerts.set(alert.seq, entry);
  page.alertIds.set(alert.alertId, alert.seq);
  const list = $("alerts");
  let before = null;  // newest first: before the first shown alert with a lower seq
  for (const node of list.children) {
    if (Number(node.dataset.seq) < alert.seq) {
      before = node;
      break;
    }
  }
  list.insertBefore(li, before);
  while (page.alerts.size > MAX_ALERTS) removeAlert(Number(list.lastElementChild.dataset.seq));
  if (alert.hasSnapshot) queueSnapshot(entry);
  setAlertsState();
  if (alert.alertId === page.focusAlert) showFocusedAlert();
}

/** Scroll to and focus the alert a notification pointed at, once it is in the list. */
function showFocusedAlert() {
  const seq = page.alertIds.get(page.focusAlert);
  const entry = seq === undefined ? null : page.alerts.get(seq);
  if (!entry) return;
  page.focusAlert = null;
  for (const node of $("alerts").querySelectorAll("li[data-focused]")) delete node.dataset.focused;
  entry.li.dataset.focused = "true";
  entry.li.tabIndex = -1;
  entry.li.scrollIntoView({block: "nearest"});
  entry.li.focus({preventScroll: true});
}

function removeAlert(seq) {
  const entry = page.alerts.get(seq);
  if (!entry) return;
  entry.li.remove();
  if (entry.thumbUrl) URL.revokeObjectURL(entry.thumbUrl);
  entry.removed = true;
  page.alerts.delete(seq);
  page.alertIds.delete(entry.alert.alertId);
}

function clearAlerts() {
  for (const seq of [...page.alerts.keys()]) removeAlert(seq);
  page.snapshotQueue = [];
  page.olderCursor = null;
  $("alerts").replaceChildren();
}

function renderAlert(alert) {
  const meta = alert.metadata;
  const what = [typeof meta.objectType === "string" ? meta.objectType : null,
                typeof meta.confidence === "number" ? `${Math.round(meta.confidence * 100)}%` : null]
    .filter(Boolean).join(" · ");
  const when = new Date(alert.timestamp);
  const time = el("time", {text: when.toLocaleTimeString(), attrs: {
    datetime: Number.isNaN(when.getTime()) ? "" : when.toISOString(),
    title: alert.receivedAt ? `received ${alert.receivedAt.toLocaleString()}` : ""}});
  const head = el("p", {className: "alert-head"}, [
    el("span", {className: "severity", text: alert.severity}),
    el("span", {className: "object", text: what}),
    time,
    el("span", {className: "seq", text: `#${alert.seq}`}),
  ]);
  const ack = el("p", {className: "alert-ack"});
  const li = el("li", {className: `alert sev-${alert.severity}`,
                       attrs: {"data-seq": String(alert.seq), "data-alert-id": alert.alertId}}, [
    el("div", {className: "thumb", attrs: {hidden: ""}}),
    el("div", {className: "alert-body"}, [head, el("p", {className: "alert-message", text: alert.message}), ack]),
  ]);
  if (alert.acknowledged) {
    showAcknowledged(li, alert.acknowledged);
  } else {
    const button = el("button", {className: "ack", text: "Acknowledge", attrs: {type: "button"}});
    button.addEventListener("click", () => acknowledge(alert.alertId, button));
    ack.append(button);
  }
  const receipts = el("ul", {className: "receipts", attrs: {hidden: ""}});
  const show = el("button", {className: "show-receipts", text: "Deliveries", attrs: {type: "button"}});
  show.addEventListener("click", () => showReceipts(alert.alertId, show, receipts));
  li.querySelector(".alert-body").append(el("p", {className: "alert-receipts"}, [show]), receipts);
  return li;
}

/** The alert's notifications: per destination its channel, state, attempts and when it was delivered. */
async function showReceipts(alertId, button, list) {
  const client = page.client;
  if (!client) return;
  if (!list.hidden) {
    list.hidden = true;
    button.setAttribute("aria-expanded", "false");
    return;
  }
  button.disabled = true;
  try {
    const {items} = await client.deliveries(alertId);
    const rows = items.map((d) => {
      const when = d.deliveredAt ? ` ${new Date(d.deliveredAt).toLocaleTimeString()}` : "";
      const attempts = `${d.attempts} attempt${d.attempts === 1 ? "" : "s"}`;
      const why = d.lastError && d.state !== "delivered" ? ` (${d.lastError})` : "";
      const what = d.purpose === "escalate" ? `${d.channel}, escalation` : d.channel;
      return el("li", {className: `receipt state-${d.state}`,
                       text: `${what}: ${d.state}${when}, ${attempts}${why}`,
                       attrs: {"data-state": d.state, "data-destination": d.destinationId}});
    });
    list.replaceChildren(...(rows.length ? rows : [el("li", {className: "receipt", text: "no notifications"})]));
    list.hidden = false;
    button.setAttribute("aria-expanded", "true");
  } catch (err) {
    if (err.isUnauthorized) {
      signOut(`Your token was refused or has expired (${err.code || err.status}). Sign in again.`);
      return;
    }
    list.replaceChildren(el("li", {className: "receipt", text: `could not read the deliveries: ${err.message}`}));
    list.hidden = false;
  } finally {
    button.disabled = false;
  }
}

async function acknowledge(alertId, button) {
  const client = page.client;
  if (!client) return;
  button.disabled = true;
  button.textContent = "Acknowledging…";
  try {
    const alert = await client.acknowledge(alertId);
    markAcknowledged(alertId, alert.acknowledged);
  } catch (err) {
    if (err.isUnauthorized) {
      signOut(`Your token was refused or has expired (${err.code || err.status}). Sign in again.`);
      return;
    }
    button.disabled = false;
    button.textContent = "Acknowledge";
    button.title = `failed: ${err.message}`;
  }
}

function markAcknowledged(alertId, acknowledged) {
  const seq = page.alertIds.get(alertId);
  const entry = seq === undefined ? null : page.alerts.get(seq);
  if (!entry || !acknowledged) return;
  entry.alert.acknowledged = {by: acknowledged.by, at: toDate(acknowledged.at)};
  showAcknowledged(entry.li, entry.alert.acknowledged);
}

function showAcknowledged(li, acknowledged) {
  li.classList.add("acknowledged");
  const at = acknowledged.at ? ` at ${acknowledged.at.toLocaleTimeString()}` : "";
  li.querySelector(".alert-ack").replaceChildren(
    el("span", {className: "acked", text: `Acknowledged by ${acknowledged.by}${at}`}));
}

function setAlertsState() {
  if (!page.selected) return;
  const node = $("alerts-state");
  const entry = page.streams.get(page.selected);
  if (entry?.deleted) return;
  const count = page.alerts.size;
  const shown = count ? `${count} alert${count === 1 ? "" : "s"}` : "No alerts yet";
  const client = page.client;
  const sub = client?.subscription(page.selected);
  let mode = "";
  if (client?.state === "waiting" || client?.state === "connecting") {
    mode = "reconnecting: alerts raised meanwhile will follow";
  } else if (sub?.accepting) {
    mode = "live";
  }
  node.textContent = mode ? `${shown}, ${mode}.` : `${shown}.`;
  node.dataset.live = String(mode === "live");
}

function onReplayComplete(m) {
  if (m.streamId === page.selected && !m.complete) {
    console.info("watchout: some alerts after the last one shown were removed by retention");
  }
}

function onHistoryReset({streamId}) {
  if (streamId !== page.selected) return;
  clearAlerts();  // a re-created stream id: its new history replays from the start
  setAlertsState();
}

// Snapshots need the Authorization header, so they are fetched and shown through blob: URLs (revoked
// when the alert leaves the list). The box comes from metadata.box, in the frame's pixels.
function queueSnapshot(entry) {
  page.snapshotQueue.push(entry);
  pumpSnapshots();
}

function pumpSnapshots() {
  while (page.snapshotsLoading < SNAPSHOT_FETCHES && page.snapshotQueue.length) {
    const entry = page.snapshotQueue.shift();
    if (entry.removed) continue;
    page.snapshotsLoading += 1;
    loadSnapshot(entry).finally(() => {
      page.snapshotsLoading -= 1;
      pumpSnapshots();
    });
  }
}

async function loadSnapshot(entry) {
  const client = page.client;
  if (!client) return;
  let blob;
  try {
    blob = await client.snapshot(entry.alert.alertId);
  } catch (err) {
    console.info(`watchout: no snapshot for alert #${entry.alert.seq}: ${err.message}`);
    return;
  }
  if (entry.removed) return;
  entry.thumbUrl = URL.createObjectURL(blob);
  const thumb = entry.li.querySelector(".thumb");
  const img = el("img", {attrs: {alt: `snapshot of alert #${entry.alert.seq}`}});
  const box = el("div", {className: "box", attrs: {hidden: ""}});
  img.addEventListener("load", () => drawBox(img, box, entry.alert.metadata.box));
  img.src = entry.thumbUrl;
  thumb.replaceChildren(img, box);
  thumb.hidden = false;
}

function drawBox(img, box, rect) {
  const width = img.naturalWidth, height = img.naturalHeight;
  if (!rect || !width || !height || ![rect.x, rect.y, rect.w, rect.h].every(Number.isFinite)) return;
  const clamp = (v) => Math.min(Math.max(v, 0), 1);
  const left = clamp(rect.x / width), top = clamp(rect.y / height);
  box.style.left = `${left * 100}%`;
  box.style.top = `${top * 100}%`;
  box.style.width = `${(clamp((rect.x + rect.w) / width) - left) * 100}%`;
  box.style.height = `${(clamp((rect.y + rect.h) / height) - top) * 100}%`;
  box.hidden = false;
}

// ---------------------------------------------------------------------------- notifications (Web Push)
// The subscription belongs to this browser (every tab of this origin), not to the tab: the toggle shows whether
// this browser has one. On: GET /api/push/public-key -> {publicKey} (the server's VAPID key, base64url), the
// browser subscribes with it, then POST /api/push/subscriptions with subscription.toJSON(). Off: the browser
// unsubscribes, then DELETE /api/push/subscriptions with {endpoint}. sw.js shows the pushed alerts.

const push = {ready: registerWorker(), busy: false};

function pushSupported() {
  return "serviceWorker" in navigator && "PushManager" in window && "Notification" in window;
}

/** The service worker's registration once active; null where there is none (no support, or not https). */
async function registerWorker() {
  if (!("serviceWorker" in navigator)) return null;
  navigator.serviceWorker.addEventListener("message", onWorkerMessage);
  navigator.serviceWorker.startMessages();
  try {
    await navigator.serviceWorker.register("sw.js", {scope: "./"});
    return await navigator.serviceWorker.ready;
  } catch (err) {
    console.info(`watchout: no service worker, so no notifications (${err.message})`);
    return null;
  }
}

/** A notification was clicked (sw.js): show its stream and alert in this tab. */
function onWorkerMessage(event) {
  if (event.data?.type !== "watchout-open" || typeof event.data.url !== "string") return;
  const params = new URLSearchParams(new URL(event.data.url, location.href).hash.slice(1));
  const streamId = params.get("stream");
  page.focusAlert = params.get("alert");
  if (!page.signedIn || !streamId) return;
  if (streamId !== page.selected) selectStream(streamId);
  else showFocusedAlert();
}

function base64UrlToBytes(text) {
  const base64 = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
  return Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
}

function sameBytes(buffer, bytes) {
  if (!buffer) return false;
  const other = new Uint8Array(buffer);
  return other.length === bytes.length && other.every((value, i) => value === bytes[i]);
}

async function browserSubscription() {
  const registration = await push.ready;
  return registration ? registration.pushManager.getSubscription() : null;
}

function setPushToggle(on) {
  const button = $("notifications");
  button.setAttribute("aria-pressed", String(on));
  button.dataset.state = on ? "on" : "off";
  button.textContent = on ? "Notifications: on" : "Notifications: off";
}

function setPushMessage(text) {
  $("notifications-message").textContent = text;
  $("notifications-message").hidden = !text;
}

/** At sign-in: whether this browser has a subscription; if so it is sent again, so the server holds it for the
 *  user now signed in (a browser shared by several users notifies the last one who signed in). */
async function showPushState() {
  let subscription = null;
  if (pushSupported() && Notification.permission === "granted") {
    try {
      subscription = await browserSubscription();
    } catch (err) {
      console.info(`watchout: cannot read the push subscription (${err.message})`);
    }
  }
  setPushToggle(Boolean(subscription));
  const client = page.client;
  if (!subscription || !client) return;
  try {
    await client.api("/api/push/subscriptions", {method: "POST", body: subscription.toJSON()});
  } catch (err) {
    console.info(`watchout: the push subscription was not renewed (${err.message})`);
  }
}

async function togglePush() {
  const button = $("notifications");
  if (push.busy || !page.client) return;
  push.busy = true;
  button.disabled = true;
  setPushMessage("");
  try {
    if (button.getAttribute("aria-pressed") === "true") await disablePush(page.client);
    else await enablePush(page.client);
  } catch (err) {
    if (err.isUnauthorized) {
      signOut(`Your token was refused or has expired (${err.code || err.status}). Sign in again.`);
      return;
    }
    setPushMessage(err.message);
  } finally {
    push.busy = false;
    button.disabled = false;
  }
}

async function enablePush(client) {
  if (!pushSupported()) {
    throw new Error("This browser cannot show notifications from this page (it needs Web Push and an https:// address).");
  }
  const permission = await Notification.requestPermission();
  if (permission !== "granted") {
    throw new Error("Notifications are blocked for this site: allow them in the browser's site settings, then try again.");
  }
  const registration = await push.ready;
  if (!registration) throw new Error("The dashboard's service worker did not start, so notifications cannot be shown.");
  let publicKey;
  try {
    ({publicKey} = await client.api("/api/push/public-key"));
  } catch (err) {
    if (err.status === 404) throw new Error("This Watchout server does not send push notifications.");
    throw new Error(`Cannot turn notifications on: ${err.message}`);
  }
  const key = base64UrlToBytes(publicKey);
  let subscription = await registration.pushManager.getSubscription();
  if (subscription && !sameBytes(subscription.options.applicationServerKey, key)) {
    await subscription.unsubscribe();  // made for another server key: its pushes would be refused
    subscription = null;
  }
  if (!subscription) {
    try {
      subscription = await registration.pushManager.subscribe({userVisibleOnly: true, applicationServerKey: key});
    } catch (err) {
      throw new Error(`This browser could not reach its push service (${err.name}: ${err.message}). ` +
                      "Notifications stay off.");
    }
  }
  try {
    await client.api("/api/push/subscriptions", {method: "POST", body: subscription.toJSON()});
  } catch (err) {
    await subscription.unsubscribe().catch(() => {});  // unknown to the server: drop it, so the toggle tells true
    if (err.isUnauthorized) throw err;
    throw new Error(`Cannot turn notifications on: ${err.message}`);
  }
  setPushToggle(true);
}

async function disablePush(client) {
  const subscription = await browserSubscription();
  setPushToggle(false);
  if (!subscription) return;
  const {endpoint} = subscription;
  await subscription.unsubscribe();
  try {
    await client.api("/api/push/subscriptions", {method: "DELETE", body: {endpoint}});
  } catch (err) {
    if (err.isUnauthorized) throw err;
    // The push service refuses this endpoint from now on: the server drops it at its next alert.
    setPushMessage(`Notifications are off in this browser; the server was not told (${err.message}).`);
  }
}

/** At sign-out, this browser stops receiving the user's alerts: best effort, in at most PUSH_FORGET_MS. */
async function forgetPush() {
  const client = page.client;
  if (!client || $("notifications").getAttribute("aria-pressed") !== "true") return;
  const timeout = new Promise((resolve) => setTimeout(resolve, PUSH_FORGET_MS));
  await Promise.race([disablePush(client).catch((err) => console.info(`watchout: ${err.message}`)), timeout]);
}

// ---------------------------------------------------------------------------- start
$("sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token-input").value.trim();
  $("token-input").value = "";
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  signIn();
});
$("sign-out").addEventListener("click", async () => {
  await forgetPush();
  signOut("Signed out.");
});
$("notifications").addEventListener("click", togglePush);
$("older").addEventListener("click", loadOlder);
setInterval(() => {
  showFps();
  if (page.client?.state === "waiting") renderConnection();  // the countdown
}, 500);

takeTokenFromFragment();
if (sessionStorage.getItem(TOKEN_KEY)) signIn();
else showSignIn("");
