// sw.js: the dashboard's service worker, registered by app.js with scope /dashboard/. It only shows Web Push
// notifications (payloads built by watchout/webpush.py `notification`) and opens the dashboard on a click;
// it has no fetch handler, so the page's requests go to the network as without it.

const ICON = new URL("icon-192.png", self.registration.scope).href;

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

/** A URL under this worker's scope, or the scope itself: a click never opens another site. */
function dashboardUrl(value) {
  const scope = self.registration.scope;
  if (typeof value !== "string" || !value) return scope;
  try {
    const url = new URL(value, scope);
    if (url.href.startsWith(scope)) return url.href;
  } catch { /* not a URL */ }
  return scope;
}

/** The notification for a push: every push must show one (userVisibleOnly), even one that does not parse. */
function notificationFor(data) {
  let content = {};
  try {
    content = data ? data.json() : {};
  } catch {
    content = {body: data ? data.text() : ""};
  }
  if (!content || typeof content !== "object") content = {};
  const text = (value) => (typeof value === "string" ? value : "");
  const options = {
    body: text(content.body),
    icon: ICON,
    badge: ICON,
    tag: text(content.tag) || "watchout",
    renotify: true,  // a new alert on the same stream replaces the last one and alerts again
    requireInteraction: content.severity === "critical",
    data: {url: dashboardUrl(content.url), alertId: text(content.alertId), streamId: text(content.streamId)},
  };
  if (text(content.image)) options.image = content.image;
  if (Number.isFinite(content.timestamp)) options.timestamp = content.timestamp;
  return {title: text(content.title) || "Watchout alert", options};
}

self.addEventListener("push", (event) => {
  const {title, options} = notificationFor(event.data);
  event.waitUntil(self.registration.showNotification(title, options));
});

async function openDashboard(url) {
  const scope = self.registration.scope;
  const windows = await self.clients.matchAll({type: "window", includeUncontrolled: true});
  const open = windows.find((client) => client.url.startsWith(scope));
  if (open) {
    // The tab keeps its sign-in (sessionStorage): it is told where to go rather than reloaded.
    const focused = await open.focus();
    (focused || open).postMessage({type: "watchout-open", url});
    return;
  }
  await self.clients.openWindow(url);
}

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  event.waitUntil(openDashboard(dashboardUrl(event.notification.data?.url)));
});
