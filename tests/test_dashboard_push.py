"""The dashboard as a PWA in a real Chromium: its service worker and manifest, the Notifications toggle, and a
pushed alert shown as a notification.

Headless Chromium here reaches no push service (and Playwright's contexts are incognito, where Chrome has no
Push API): pushManager.subscribe() is refused, which the page must say. The REST contract of the toggle is then
checked with a stand-in PushManager (an init script), and a push is delivered to the service worker through
the DevTools protocol (ServiceWorker.deliverPushMessage). The /api/push/* routes are answered by page.route.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
import tornado.httpclient
import tornado.websocket

from conftest import Server, launch_chromium, need_chromium, start_server
from watchout.settings import Settings
from watchout.webpush import VapidKeys, notification

pytestmark = pytest.mark.asyncio(loop_scope="module")
MakeToken = Callable[..., str]
TIMEOUT_MS = 10_000


@pytest_asyncio.fixture(loop_scope="module")
async def site(settings: Settings) -> AsyncIterator[Server]:
    server, close = await start_server(settings)
    yield server
    await close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Any]:
    need_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await launch_chromium(playwright)
        yield chromium
        await chromium.close()


@dataclass
class PushApi:
    """Stand-ins for GET /api/push/public-key and POST/DELETE /api/push/subscriptions: what the page sent."""

    public_key: str
    key_status: int = 200
    calls: list[tuple[str, str, str | None, Any]] = field(default_factory=list)

    async def install(self, page: Any) -> None:
        await page.route("**/api/push/public-key", self._answer)
        await page.route("**/api/push/subscriptions", self._answer)

    async def _answer(self, route: Any) -> None:
        request = route.request
        body = json.loads(request.post_data) if request.post_data else None
        path = request.url.split("://", 1)[1].split("/", 1)[1]
        self.calls.append((request.method, "/" + path, await request.header_value("authorization"), body))
        if path == "api/push/public-key":
            if self.key_status != 200:
                await route.fulfill(status=self.key_status, json={"error": {"code": "not-found", "message": "no"}})
            else:
                await route.fulfill(status=200, json={"publicKey": self.public_key})
        elif request.method == "POST":
            assert isinstance(body, dict)
            await route.fulfill(status=201, json={"endpoint": body["endpoint"]})
        else:
            await route.fulfill(status=204)


@dataclass
class Tab:
    page: Any
    context: Any
    errors: list[str]


async def open_dashboard(browser: Any, site: Server, token: str | None, *, fragment: str = "",
                         grant: bool = True, init_script: str | None = None, api: PushApi | None = None) -> Tab:
    context = await browser.new_context()
    if grant:
        await context.grant_permissions(["notifications"], origin=site.url(""))
    if init_script:
        await context.add_init_script(init_script)
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}")
            if "Content Security Policy" in msg.text else None)
    if api is not None:
        await api.install(page)
    parts = ([f"token={token}"] if token else []) + ([fragment] if fragment else [])
    await page.goto(site.url("/dashboard/" + ("#" + "&".join(parts) if parts else "")))
    return Tab(page, context, errors)


async def until(page: Any, expression: str, arg: Any = None, timeout_s: float = TIMEOUT_MS / 1000) -> Any:
    """Poll a page condition (a JS function of `arg`) until truthy; evaluate() is not subject to the page's CSP."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await page.evaluate(expression, arg)
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{expression} stayed {value!r}")
        await asyncio.sleep(0.05)


async def toggle_state(tab: Tab) -> str:
    """The toggle once it is idle: "on" or "off"."""
    state: str = await until(tab.page, "() => { const b = document.getElementById('notifications');"
                                       " return !b.hidden && !b.disabled && b.dataset.state; }")
    return state


async def calls_reach(api: PushApi, count: int) -> None:
    """Wait until the page has made `count` /api/push calls (they are answered on this loop)."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_MS / 1000
    while len(api.calls) < count:
        assert asyncio.get_running_loop().time() < deadline, api.calls
        await asyncio.sleep(0.05)


async def click_toggle(tab: Tab, api: PushApi | None, calls: int) -> None:
    await tab.page.click("#notifications")
    if api is not None:
        await calls_reach(api, calls)
    await toggle_state(tab)


# ----------------------------------------------------------------------------- the PWA's files

async def test_the_dashboard_registers_its_worker_and_links_a_manifest_chromium_parses(
        browser: Any, site: Server, token: MakeToken) -> None:
    http = tornado.httpclient.AsyncHTTPClient()
    policy = (await http.fetch(site.url("/dashboard/"))).headers["Content-Security-Policy"]
    for name, kind in (("sw.js", "javascript"), ("manifest.webmanifest", "application/manifest+json"),
                       ("icon-192.png", "image/png"), ("icon-512.png", "image/png")):
        response = await http.fetch(site.url(f"/dashboard/{name}"))
        assert kind in response.headers["Content-Type"], name
        assert response.headers["Content-Security-Policy"] == policy and response.headers["Cache-Control"] == "no-cache"

    tab = await open_dashboard(browser, site, token("alice"), grant=False)
    try:
        worker = await tab.page.evaluate("""async () => {
            const registration = await navigator.serviceWorker.ready;
            return {scope: registration.scope, script: registration.active.scriptURL};
        }""")
        assert worker == {"scope": site.url("/dashboard/"), "script": site.url("/dashboard/sw.js")}
        manifest = await tab.page.evaluate("""async () => {
            const link = document.querySelector('link[rel="manifest"]');
            const response = await fetch(link.href);
            return {href: link.href, status: response.status, body: await response.json()};
        }""")
        assert manifest["href"] == site.url("/dashboard/manifest.webmanifest") and manifest["status"] == 200
        body = manifest["body"]
        assert body["scope"] == body["start_url"] == "/dashboard/" and body["display"] == "standalone"
        assert {icon["sizes"] for icon in body["icons"]} == {"192x192", "512x512"}
        cdp = await tab.context.new_cdp_session(tab.page)
        parsed = await cdp.send("Page.getAppManifest")
        assert parsed["url"] == manifest["href"] and parsed["errors"] == [], parsed["errors"]
        icons = await tab.page.evaluate("""async (icons) => Promise.all(icons.map(async (icon) => {
            const image = new Image();
            image.src = icon.src;
            await image.decode();
            return `${image.naturalWidth}x${image.naturalHeight}`;
        }))""", body["icons"])
        assert icons == [icon["sizes"] for icon in body["icons"]]
        await until(tab.page, "() => !document.getElementById('notifications').hidden")
        assert await toggle_state(tab) == "off"
        assert not tab.errors, tab.errors
    finally:
        await tab.context.close()


async def test_the_toggle_is_only_for_a_signed_in_user(browser: Any, site: Server) -> None:
    tab = await open_dashboard(browser, site, None)
    try:
        await until(tab.page, "() => !document.getElementById('sign-in').hidden")
        assert await tab.page.evaluate("() => document.getElementById('notifications').hidden")
    finally:
        await tab.context.close()


# ----------------------------------------------------------------------------- the toggle

async def test_without_a_push_service_the_toggle_says_why_and_stays_off(
        browser: Any, site: Server, token: MakeToken) -> None:
    alice = token("alice")
    api = PushApi(VapidKeys.generate().public_key_b64)
    tab = await open_dashboard(browser, site, alice, api=api)
    try:
        assert await toggle_state(tab) == "off"
        await click_toggle(tab, api, 1)
        message = await until(tab.page, "() => document.getElementById('notifications-message').textContent")
        assert "could not reach its push service" in message and "Notifications stay off" in message, message
        assert await toggle_state(tab) == "off"
        assert await tab.page.get_attribute("#notifications", "aria-pressed") == "false"
        assert api.calls == [("GET", "/api/push/public-key", f"Bearer {alice}", None)]  # and no POST
        assert not tab.errors, tab.errors
    finally:
        await tab.context.close()


async def test_blocked_notifications_and_a_server_without_push_are_explained(
        browser: Any, site: Server, token: MakeToken) -> None:
    api = PushApi(VapidKeys.generate().public_key_b64, key_status=404)
    tab = await open_dashboard(browser, site, token("alice"), api=api)
    try:
        await click_toggle(tab, api, 1)
        message = await until(tab.page, "() => document.getElementById('notifications-message').textContent")
        assert message == "This Watchout server does not send push notifications."
        assert await toggle_state(tab) == "off" and not tab.errors
    finally:
        await tab.context.close()
    # Chromium denies a permission request nobody answers in headless mode: the page says how to allow it
    tab = await open_dashboard(browser, site, token("alice"), grant=False, api=api)
    try:
        await tab.context.clear_permissions()
        await click_toggle(tab, None, 0)
        message = await until(tab.page, "() => document.getElementById('notifications-message').textContent")
        assert message.startswith("Notifications are blocked for this site"), message
        assert api.calls[1:] == [] and await toggle_state(tab) == "off" and not tab.errors
    finally:
        await tab.context.close()


# The browser's push service, stood in for: subscribe() records its options and returns a subscription whose
# toJSON() is what Chrome's looks like; unsubscribe() forgets it. It lasts across reloads, as a real one does.
FAKE_PUSH_MANAGER = """(() => {
  const record = {subscribes: [], unsubscribes: 0};
  window.__push = record;
  const made = (key) => {
    const json = {endpoint: "https://push.example.com/wpush/v2/gAAAAABn", expirationTime: null, keys: {
      p256dh: "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM",
      auth: "tBHItJI5svbpez7KI4CCXg"}};
    return {endpoint: json.endpoint, expirationTime: null, toJSON: () => json,
            options: {applicationServerKey: new Uint8Array(key).buffer, userVisibleOnly: true},
            unsubscribe: async () => { localStorage.removeItem("fake-push"); record.unsubscribes += 1; return true; }};
  };
  PushManager.prototype.getSubscription = async function () {
    const key = localStorage.getItem("fake-push");
    return key ? made(JSON.parse(key)) : null;
  };
  PushManager.prototype.subscribe = async function (options) {
    const key = Array.from(new Uint8Array(options.applicationServerKey));
    record.subscribes.push({userVisibleOnly: options.userVisibleOnly, key});
    localStorage.setItem("fake-push", JSON.stringify(key));
    return made(key);
  };
})();"""


async def test_the_toggle_sends_the_subscription_and_withdraws_it(browser: Any, site: Server,
                                                                  token: MakeToken) -> None:
    alice = token("alice")
    keys = VapidKeys.generate()
    api = PushApi(keys.public_key_b64)
    tab = await open_dashboard(browser, site, alice, init_script=FAKE_PUSH_MANAGER, api=api)
    bearer = f"Bearer {alice}"
    endpoint = "https://push.example.com/wpush/v2/gAAAAABn"
    try:
        assert await toggle_state(tab) == "off"
        await click_toggle(tab, api, 2)
        assert await toggle_state(tab) == "on"
        assert await tab.page.get_attribute("#notifications", "aria-pressed") == "true"
        subscribes = await tab.page.evaluate("() => window.__push.subscribes")
        assert subscribes == [{"userVisibleOnly": True, "key": list(keys.public_key)}]
        get, post = api.calls
        assert get == ("GET", "/api/push/public-key", bearer, None)
        assert post[:3] == ("POST", "/api/push/subscriptions", bearer)
        assert post[3] == {"endpoint": endpoint, "expirationTime": None, "keys": {
            "p256dh": "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM",
            "auth": "tBHItJI5svbpez7KI4CCXg"}}

        await tab.page.reload()  # a subscription the browser has is sent again at sign-in, and shown as on
        assert await toggle_state(tab) == "on"
        await calls_reach(api, 3)
        assert api.calls[2] == post
        del api.calls[2]

        await click_toggle(tab, api, 3)
        assert await toggle_state(tab) == "off"
        assert api.calls[2] == ("DELETE", "/api/push/subscriptions", bearer, {"endpoint": endpoint})
        assert await tab.page.evaluate("() => window.__push.unsubscribes") == 1

        await click_toggle(tab, api, 5)  # on again, then an explicit sign-out withdraws it
        assert await toggle_state(tab) == "on"
        await tab.page.click("#sign-out")
        await until(tab.page, "() => !document.getElementById('sign-in').hidden")
        assert [call[:2] for call in api.calls[3:]] == [("GET", "/api/push/public-key"),
                                                        ("POST", "/api/push/subscriptions"),
                                                        ("DELETE", "/api/push/subscriptions")]
        assert api.calls[5][2:] == (bearer, {"endpoint": endpoint})
        assert await tab.page.evaluate("() => document.getElementById('notifications').hidden")
        assert not tab.errors, tab.errors
    finally:
        await tab.context.close()


# ----------------------------------------------------------------------------- a push arriving

async def push_to_worker(tab: Tab, site: Server, data: str) -> list[dict[str, Any]]:
    """Deliver `data` to the dashboard's service worker as a push; the notifications it then shows."""
    await tab.page.evaluate("async () => { await navigator.serviceWorker.ready; }")
    cdp = await tab.context.new_cdp_session(tab.page)
    registrations: list[dict[str, Any]] = []
    cdp.on("ServiceWorker.workerRegistrationUpdated", lambda event: registrations.extend(event["registrations"]))
    await cdp.send("ServiceWorker.enable")
    deadline = asyncio.get_running_loop().time() + TIMEOUT_MS / 1000
    while not registrations and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    [registration] = [r for r in registrations if r["scopeURL"] == site.url("/dashboard/") and not r["isDeleted"]]
    await cdp.send("ServiceWorker.deliverPushMessage", {"origin": site.url("/"), "data": data,
                                                        "registrationId": registration["registrationId"]})
    shown: list[dict[str, Any]] = await until(tab.page, """async () => {
        const registration = await navigator.serviceWorker.ready;
        const shown = await registration.getNotifications();
        return shown.length && shown.map((n) => ({title: n.title, body: n.body, tag: n.tag, data: n.data, icon: n.icon,
            image: n.image, timestamp: n.timestamp, renotify: n.renotify, requireInteraction: n.requireInteraction}));
    }""")
    return shown


async def test_a_pushed_alert_is_shown_as_a_notification_linking_to_it(browser: Any, site: Server,
                                                                       token: MakeToken) -> None:
    dashboard = site.url("/dashboard/")
    alert = {"streamId": "porch", "alertId": "a-42", "severity": "critical", "message": "person at the door",
             "timestamp": 1_764_150_000_000, "snapshotUrl": site.url("/api/alerts/a-42/snapshot.jpg")}
    tab = await open_dashboard(browser, site, token("alice"))
    try:
        [shown] = await push_to_worker(tab, site, notification(alert, dashboard).decode())
        link = f"{dashboard}#stream=porch&alert=a-42"
        assert shown == {"title": "critical alert on porch", "body": "person at the door", "tag": "porch",
                         "data": {"url": link, "alertId": "a-42", "streamId": "porch"},
                         "icon": site.url("/dashboard/icon-192.png"), "image": alert["snapshotUrl"],
                         "timestamp": 1_764_150_000_000, "renotify": True, "requireInteraction": True}
        assert not tab.errors, tab.errors
    finally:
        await tab.context.close()


async def test_a_push_that_is_not_json_or_links_elsewhere_still_shows_and_stays_on_the_dashboard(
        browser: Any, site: Server, token: MakeToken) -> None:
    tab = await open_dashboard(browser, site, token("alice"))
    try:
        [plain] = await push_to_worker(tab, site, "the camera saw something")
        assert (plain["title"], plain["body"], plain["tag"]) == ("Watchout alert", "the camera saw something",
                                                                 "watchout")
        assert plain["data"]["url"] == site.url("/dashboard/") and plain["image"] == ""
    finally:
        await tab.context.close()
    tab = await open_dashboard(browser, site, token("alice"))
    try:
        elsewhere = json.dumps({"title": "t", "body": "b", "tag": "cam", "url": "https://evil.example.com/"})
        [shown] = await push_to_worker(tab, site, elsewhere)
        assert shown["data"]["url"] == site.url("/dashboard/") and shown["requireInteraction"] is False
    finally:
        await tab.context.close()


# ----------------------------------------------------------------------------- a notification's link

async def raise_alert(site: Server, service_token: str, stream_id: str, message: str) -> None:
    ws = await tornado.websocket.websocket_connect(site.ws_url)
    try:
        await ws.write_message(json.dumps({"type": "auth", "token": service_token, "id": "auth"}))
        await ws.write_message(json.dumps({"type": "alert", "id": message, "streamId": stream_id, "severity": "high",
                                           "message": message, "timestamp": 1_764_150_000_000, "metadata": {}}))
        while True:
            raw = await asyncio.wait_for(ws.read_message(), 5)
            assert raw is not None, f"closed: {ws.close_code} {ws.close_reason}"
            reply = json.loads(raw)
            assert reply["type"] != "error", reply
            if reply["type"] == "ack":
                return
    finally:
        ws.close()


async def test_the_notifications_link_opens_the_dashboard_on_its_alert(
        browser: Any, site: Server, token: MakeToken) -> None:
    alice, service = token("alice"), token("detector", role="service", streams="*")
    http = tornado.httpclient.AsyncHTTPClient()
    headers = {"Authorization": f"Bearer {alice}", "Content-Type": "application/json"}
    await http.fetch(site.url("/api/streams"), method="POST", headers=headers,
                     body=json.dumps({"streamId": "porch", "name": "porch"}))
    for i in range(3):
        await raise_alert(site, service, "porch", f"person {i}")
    listed = json.loads((await http.fetch(site.url("/api/streams/porch/alerts"),
                                          headers={"Authorization": f"Bearer {alice}"})).body)
    wanted = next(item["alertId"] for item in listed["items"] if item["message"] == "person 1")
    link = json.loads(notification({**listed["items"][0], "alertId": wanted}, site.url("/dashboard/")))["url"]
    tab = await open_dashboard(browser, site, alice, fragment=link.split("#", 1)[1])
    try:
        focused = await until(tab.page, "() => document.activeElement?.dataset?.alertId")
        assert focused == wanted
        assert await tab.page.evaluate("() => document.querySelectorAll('#alerts li[data-focused]').length") == 1
        assert await tab.page.evaluate("() => location.hash") == "", "the token left the address bar"
        assert not tab.errors, tab.errors
    finally:
        await tab.context.close()
