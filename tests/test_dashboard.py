"""The web dashboard at /dashboard/ in a real Chromium (Playwright, async API on the server's own loop).

One browser serves the whole module; each test gets a fresh server over its own store, and a fresh browser
context (so a fresh sessionStorage). Pages are awaited on conditions, never on fixed sleeps.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
import tornado.httpclient
import tornado.websocket

from conftest import Server, artifacts_dir, launch_chromium, need_chromium, start_server
from watchout.client import Backoff
from watchout.settings import Settings
from watchout.store import Store, open_store

pytestmark = pytest.mark.asyncio(loop_scope="module")
MakeToken = Callable[..., str]
TIMEOUT_MS = 10_000


# ----------------------------------------------------------------------------- the server, restartable

@dataclass
class Site:
    """The app over one store; stop() and start() again on the same port look like a process restart."""

    settings: Settings
    store: Store
    port: int = 0
    server: Server | None = None
    _close: Any = None

    async def start(self) -> Server:
        self.server, self._close = await start_server(self.settings, self.store, self.port)
        self.port = self.server.port
        return self.server

    async def stop(self) -> None:
        """As on SIGTERM: pending alert writes finish, every socket is closed with 1001."""
        if self._close is not None:
            await self._close()
        self.server, self._close = None, None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@pytest_asyncio.fixture(loop_scope="module")
async def site(settings: Settings) -> AsyncIterator[Site]:
    store = open_store(settings)
    await store.start(0.0)
    site = Site(settings, store)
    await site.start()
    yield site
    await site.stop()
    store.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Any]:
    need_chromium()
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=TIMEOUT_MS)
    async with async_playwright() as playwright:
        chromium = await launch_chromium(playwright)
        yield chromium
        await chromium.close()


@dataclass
class Tab:
    """A page in its own browser context, with what it logged and the WebSockets it opened."""

    page: Any
    context: Any
    errors: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        """No uncaught exception, and nothing the Content-Security-Policy refused."""
        assert not self.errors, self.errors


async def open_dashboard(browser: Any, site: Site, token: str | None = None, stream: str | None = None,
                         viewport: dict[str, int] | None = None) -> Tab:
    context = await browser.new_context(viewport=viewport or {"width": 1280, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    tab = Tab(page, context)
    page.on("pageerror", lambda exc: tab.errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: tab.errors.append(f"console: {msg.text}")
            if "Content Security Policy" in msg.text else None)
    page.on("websocket", lambda ws: tab.sockets.append(ws.url))
    fragment = "&".join(f"{k}={v}" for k, v in (("token", token), ("stream", stream)) if v)
    await page.goto(site.url("/dashboard/" + (f"#{fragment}" if fragment else "")))
    return tab


# ----------------------------------------------------------------------------- helpers

def snapshot_jpeg() -> bytes:
    from watchout.simulators import render_frame
    return render_frame(1_764_150_000.0, 320, 240)


async def rest(site: Site, method: str, path: str, token: str, body: Any = None) -> Any:
    request = tornado.httpclient.HTTPRequest(
        site.url(path), method=method, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        body=json.dumps(body) if body is not None else ("" if method == "POST" else None),
        allow_nonstandard_methods=True)
    response = await tornado.httpclient.AsyncHTTPClient().fetch(request, raise_error=False)
    assert response.code < 300, (method, path, response.code, response.body)
    return json.loads(response.body) if response.body else None


async def raise_alerts(ws_url: str, token: str, stream_id: str, count: int, *, prefix: str,
                       snapshot: bytes | None = None) -> list[int]:
    """An ML service's alerts (each with a box, some with a snapshot), each acknowledged: their seqs."""
    ws = await tornado.websocket.websocket_connect(ws_url)
    try:
        ws.write_message(json.dumps({"type": "auth", "token": token, "id": "auth"}))
        seqs = []
        for i in range(count):
            alert: dict[str, Any] = {
                "type": "alert", "id": f"{prefix}-{i}", "streamId": stream_id, "severity": ["high", "medium"][i % 2],
                "message": f"{prefix} person {i}", "timestamp": 1_764_150_000_000 + i,
                "metadata": {"confidence": 0.9, "objectType": "person", "box": {"x": 40, "y": 30, "w": 100, "h": 80}}}
            if snapshot is not None:
                alert["snapshot"] = base64.b64encode(snapshot).decode()
            ws.write_message(json.dumps(alert))
            while True:
                raw = await asyncio.wait_for(ws.read_message(), 5)
                assert raw is not None, f"closed: {ws.close_code} {ws.close_reason}"
                message = json.loads(raw)
                assert message["type"] != "error", message
                if message["type"] == "ack":
                    seqs.append(message["seq"])
                    break
        return seqs
    finally:
        ws.close()


async def stored_seqs(site: Site, admin: str, stream_id: str) -> list[int]:
    page = await rest(site, "GET", f"/api/streams/{stream_id}/alerts?limit=500", admin)
    return [item["seq"] for item in page["items"]]


async def shown_seqs(tab: Tab) -> list[int]:
    seqs: list[int] = await tab.page.eval_on_selector_all("#alerts li", "els => els.map(e => Number(e.dataset.seq))")
    return seqs


async def until(page: Any, expression: str, arg: Any = None, timeout_s: float = TIMEOUT_MS / 1000) -> Any:
    """Poll a page condition (a JS function of `arg`) until it is truthy; its value.

    Playwright's own polling evaluates the predicate from a string inside the page, which the dashboard's
    Content-Security-Policy (no 'unsafe-eval') rightly refuses; evaluate() is not subject to it.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await page.evaluate(expression, arg)
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{expression} stayed {value!r}")
        await asyncio.sleep(0.05)


async def wait_for_seqs(tab: Tab, expected: list[int]) -> None:
    try:
        await until(tab.page, "want => JSON.stringify([...document.querySelectorAll('#alerts li')]"
                              ".map(e => Number(e.dataset.seq))) === want", json.dumps(expected, separators=(",", ":")))
    except TimeoutError:
        raise AssertionError(f"the page shows alerts {await shown_seqs(tab)}, expected {expected}") from None


async def create_stream(site: Site, owner_token: str, stream_id: str) -> None:
    await rest(site, "POST", "/api/streams", owner_token, {"name": stream_id, "streamId": stream_id})


def save_screenshot_path(name: str) -> str:
    return str(artifacts_dir() / name)


# ----------------------------------------------------------------------------- the page as served

async def test_page_is_served_with_a_strict_policy_and_no_inline_script(site: Site) -> None:
    client = tornado.httpclient.AsyncHTTPClient()
    moved = await client.fetch(site.url("/dashboard"), follow_redirects=False, raise_error=False)
    assert moved.code == 301 and moved.headers["Location"] == "/dashboard/"
    page = await client.fetch(site.url("/dashboard/"))
    assert page.headers["Content-Type"].startswith("text/html")
    policy = page.headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["connect-src"] == f"'self' ws://127.0.0.1:{site.port} wss://127.0.0.1:{site.port}"
    assert directives["img-src"] == "'self' blob: data:" and directives["default-src"] == "'none'"
    assert page.headers["X-Content-Type-Options"] == "nosniff" and page.headers["Referrer-Policy"] == "no-referrer"
    html = page.body.decode()
    scripts = re.findall(r"<script\b([^>]*)>", html)
    assert scripts and all("src=" in attrs for attrs in scripts), "an inline script would be refused"
    assert not re.search(r"\son\w+\s*=|\sstyle\s*=", html), "inline handlers and styles would be refused"
    for name, kind in (("app.js", "javascript"), ("watchout-client.js", "javascript"), ("style.css", "text/css")):
        response = await client.fetch(site.url(f"/dashboard/{name}"))
        assert kind in response.headers["Content-Type"] and response.headers["Cache-Control"] == "no-cache"
        assert response.headers["Content-Security-Policy"] == policy
    for path in ("/dashboard/nothing.js", "/dashboard/..%2fapp.py", "/dashboard/%2e%2e/__init__.py"):
        response = await client.fetch(site.url(path), raise_error=False)
        assert response.code in (403, 404), path
    spoofed = await client.fetch(site.url("/dashboard/"), headers={"Host": "a*b_c"})
    connect = dict(d.strip().split(" ", 1) for d in spoofed.headers["Content-Security-Policy"].split(";"))
    assert connect["connect-src"] == "'self'" and connect["script-src"] == "'self'"


# ----------------------------------------------------------------------------- the client module alone

# A stand-in for the browser's WebSocket, driven by the script below: recv() delivers a server message,
# drop() closes the connection with a code.
FAKE_SOCKET = """
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url; this.readyState = 0; this.sent = []; FakeSocket.all.push(this);
    setTimeout(() => { this.readyState = 1; this.onopen && this.onopen(); }, 0);
  }
  send(text) { this.sent.push(JSON.parse(text)); }
  close() { this.readyState = 3; }
  recv(message) { this.onmessage({data: JSON.stringify(message)}); }
  drop(code, reason = "") { this.readyState = 3; this.onclose({code, reason}); }
}
const tick = () => new Promise((resolve) => setTimeout(resolve, 5));
async function until(test) {
  for (let i = 0; i < 400 && !test(); i++) await tick();
  if (!test()) throw new Error("timed out");
}
const alert = (seq) => ({type: "alert", streamId: "porch", seq, alertId: `a${seq}`, severity: "low", message: "m",
                         metadata: {}, timestamp: 1, receivedAt: 1});
async function answer(socket) {  // authenticated, then subscribed: returns the subscribe message
  await until(() => socket.sent.length >= 1);
  socket.recv({type: "authenticated", sub: "alice", role: "user", expiresAt: Date.now() + 3600e3,
               ref: socket.sent[0].id});
  await until(() => socket.sent.length >= 2);
  const subscribe = socket.sent[1];
  socket.recv({type: "subscribed", streamId: "porch", connectionId: "c", status: "online", format: "binary",
               ref: subscribe.id});
  return subscribe;
}
"""

CLIENT_SCRIPT = "async () => {" + FAKE_SOCKET + """
  const {WatchoutClient, Backoff, decodeBinaryFrame, apiBase} = await import("./watchout-client.js");
  const out = {};
  // the documented example frame: cam-1, 1764150000000, 640x480, then the JPEG's first two bytes
  const bytes = [0x57, 0x4f, 0x01, 0x05, 0, 0, 0x01, 0x9a, 0xbf, 0x88, 0xb9, 0x80, 0x02, 0x80, 0x01, 0xe0,
                 0x63, 0x61, 0x6d, 0x2d, 0x31, 0xff, 0xd8];
  const frame = decodeBinaryFrame(new Uint8Array(bytes).buffer);
  out.frame = [frame.streamId, frame.timestamp, frame.width, frame.height, [...frame.jpeg]];
  out.apiBase = apiBase("wss://watch.example.com/ws");
  out.delays = [0, 1, 2, 3, 4, 5, 6, 7, 8].map((n) => new Backoff({random: () => 1}).delayMs(n));

  let tokens = 0;
  const client = new WatchoutClient({url: "ws://fake/ws", token: () => `token-${++tokens}`,
                                     WebSocketImpl: FakeSocket, backoff: new Backoff({random: () => 0})});
  const alerts = [];
  client.on("alert", (a) => alerts.push(a.seq));
  client.watch("porch", {sinceSeq: 5, video: false});
  client.start();
  await until(() => FakeSocket.all.length === 1);
  let socket = FakeSocket.all[0];
  out.firstSubscribe = await answer(socket);
  out.firstAuth = socket.sent[0];
  for (const seq of [5, 6, 6, 7]) socket.recv(alert(seq));
  socket.drop(1001, "server shutting down");
  await until(() => FakeSocket.all.length === 2);
  socket = FakeSocket.all[1];
  out.secondSubscribe = await answer(socket);
  for (const seq of [7, 8]) socket.recv(alert(seq));
  out.alerts = alerts;
  out.repeats = client.subscription("porch").alertRepeats;
  socket.drop(4401, "token expired");  // once: reconnect with a fresh token
  await until(() => FakeSocket.all.length === 3);
  socket = FakeSocket.all[2];
  await until(() => socket.sent.length >= 1);
  out.freshToken = socket.sent[0].token;
  socket.drop(4401, "token refused");  // twice in a row: stop
  await until(() => client.state === "closed");
  await tick();
  out.sockets = FakeSocket.all.length;
  out.error = [client.error.closeCode, client.error.isUnauthorized];

  FakeSocket.all = [];  // 4410 stops at once
  const other = new WatchoutClient({url: "ws://fake/ws", token: "t", WebSocketImpl: FakeSocket,
                                    backoff: new Backoff({random: () => 0})});
  other.start();
  await until(() => FakeSocket.all.length === 1 && FakeSocket.all[0].sent.length >= 1);
  FakeSocket.all[0].drop(4410, "stream deleted");
  await until(() => other.state === "closed");
  out.deleted = [other.error.closeCode, FakeSocket.all.length];

  FakeSocket.all = [];  // a token provider: at 80% of the lifetime a fresh token goes out with `auth`
  let fresh = 0;
  const refreshing = new WatchoutClient({url: "ws://fake/ws", token: () => `fresh-${++fresh}`,
                                         WebSocketImpl: FakeSocket});
  refreshing.start();
  await until(() => FakeSocket.all.length === 1 && FakeSocket.all[0].sent.length >= 1);
  socket = FakeSocket.all[0];
  socket.recv({type: "authenticated", sub: "alice", role: "user", expiresAt: Date.now() + 1000,
               ref: socket.sent[0].id});
  await until(() => socket.sent.length >= 2);
  out.refresh = socket.sent.map((m) => [m.type, m.token]);
  refreshing.close();
  return out;
}"""


async def test_client_module_resumes_with_since_seq_drops_repeats_and_stops_on_4401_twice(
        site: Site, browser: Any) -> None:
    tab = await open_dashboard(browser, site)
    result = await tab.page.evaluate(CLIENT_SCRIPT)
    assert result["frame"] == ["cam-1", 1764150000000, 640, 480, [0xff, 0xd8]]
    assert result["apiBase"] == "https://watch.example.com"
    sdk = Backoff(random=lambda: 1.0)
    assert result["delays"] == [pytest.approx(sdk.delay_s(n) * 1000) for n in range(9)]  # the SDK's schedule
    assert result["firstAuth"]["type"] == "auth" and result["firstAuth"]["token"] == "token-1"
    assert result["firstSubscribe"]["sinceSeq"] == 5 and result["firstSubscribe"]["format"] == "binary"
    assert result["firstSubscribe"]["consumes"] == ["alert"]
    assert result["secondSubscribe"]["sinceSeq"] == 7  # resumes after the last alert it delivered
    assert result["alerts"] == [6, 7, 8] and result["repeats"] == 3
    assert result["freshToken"] == "token-2"
    assert result["sockets"] == 3 and result["error"] == [4401, True]
    assert result["deleted"] == [4410, 1]
    assert result["refresh"] == [["auth", "fresh-1"], ["auth", "fresh-2"]]
    tab.assert_clean()
    await tab.context.close()


EPOCH_SCRIPT = "async () => {" + FAKE_SOCKET + """
  const {WatchoutClient, Backoff} = await import("./watchout-client.js");
  const events = [];
  const client = new WatchoutClient({url: "ws://fake/ws", token: "t", WebSocketImpl: FakeSocket,
                                     backoff: new Backoff({random: () => 0})});
  client.on("history-reset", (r) => events.push(["reset", r.epoch]));
  client.on("alert", (a) => events.push(["alert", a.epoch, a.seq]));
  client.watch("porch", {sinceSeq: 50, epoch: "old", video: false});
  client.start();
  await until(() => FakeSocket.all.length === 1 && FakeSocket.all[0].sent.length >= 1);
  let socket = FakeSocket.all[0];
  socket.recv({type: "authenticated", sub: "alice", role: "user", expiresAt: Date.now() + 3600e3,
               ref: socket.sent[0].id});
  await until(() => socket.sent.length >= 2);
  const first = socket.sent[1];
  // the stream was deleted and created again: the server starts the new history from its first alert
  socket.recv({type: "subscribed", streamId: "porch", connectionId: "c", status: "online", format: "binary",
               epoch: "new", lastSeq: 3, reset: true, ref: first.id});
  for (const seq of [1, 2, 3]) socket.recv(alert(seq));
  socket.recv({type: "replay-complete", streamId: "porch", lastSeq: 3, complete: false, reset: true});
  socket.drop(1001, "server shutting down");
  await until(() => FakeSocket.all.length === 2);
  socket = FakeSocket.all[1];
  const second = await answer(socket);
  client.close();
  const subscribes = FakeSocket.all.map((f) => f.sent.filter((m) => m.type === "subscribe").length);

  FakeSocket.all = [];  // a position without its epoch, beyond the history's end: start the history again
  const legacy = new WatchoutClient({url: "ws://fake/ws", token: "t", WebSocketImpl: FakeSocket});
  legacy.watch("porch", {sinceSeq: 9, video: false});
  legacy.start();
  await until(() => FakeSocket.all.length === 1);
  socket = FakeSocket.all[0];
  const asked = await answer(socket);
  socket.recv({type: "replay-complete", streamId: "porch", lastSeq: 9, complete: false});
  await until(() => socket.sent.length >= 3);
  const again = socket.sent[2];
  legacy.close();
  return {first: [first.sinceSeq, first.epoch], second: [second.sinceSeq, second.epoch], events, subscribes,
          legacy: [asked.sinceSeq, asked.epoch ?? null, again.type, again.sinceSeq]};
}"""


async def test_client_module_starts_a_new_history_from_its_first_alert_and_resumes_in_it(
        site: Site, browser: Any) -> None:
    tab = await open_dashboard(browser, site)
    result = await tab.page.evaluate(EPOCH_SCRIPT)
    assert result["first"] == [50, "old"]
    assert result["events"] == [["reset", "new"], ["alert", "new", 1], ["alert", "new", 2], ["alert", "new", 3]]
    assert result["second"] == [3, "new"]  # resumes in the new history
    assert result["subscribes"] == [1, 1]  # no extra subscribe after the reset
    assert result["legacy"] == [9, None, "subscribe", 0]
    tab.assert_clean()
    await tab.context.close()


# ----------------------------------------------------------------------------- an operator's session

async def test_operator_watches_live_video_and_alerts_and_acknowledges(site: Site, browser: Any,
                                                                       token: MakeToken) -> None:
    from playwright.async_api import expect

    from watchout.simulators import run_camera, run_ml

    admin, alice = token("root", role="admin"), token("alice")
    service = token("detector", role="service", streams="*")
    stop, registered = asyncio.Event(), asyncio.Event()
    camera = asyncio.create_task(run_camera(site.ws_url, alice, "porch", fps=10, size=(320, 240), stop=stop,
                                            ready=registered))
    await asyncio.wait_for(registered.wait(), 5)
    await create_stream(site, token("bob"), "garage")  # someone else's: an admin sees it too
    earlier = await raise_alerts(site.ws_url, service, "porch", 2, prefix="earlier", snapshot=snapshot_jpeg())
    tab = await open_dashboard(browser, site, admin, "porch")
    page = tab.page
    ml_task: asyncio.Task[Any] | None = None
    try:
        assert "token" not in page.url and "#" not in page.url  # moved off the address bar at once
        assert await page.evaluate("sessionStorage.getItem('watchout.token')") == admin
        await expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
        await expect(page.locator("#principal")).to_have_text("root (admin)")
        await expect(page.locator("#streams li[data-stream-id=garage]")).to_be_visible()  # admins see every stream
        await expect(page.locator("#streams li[data-stream-id=porch]")).to_have_attribute("data-status", "streaming")
        await expect(page.locator("#view-status")).to_have_attribute("data-status", "streaming")
        await wait_for_seqs(tab, sorted(earlier, reverse=True))  # the history, newest first

        # frames are drawn as they arrive: the picture changes and the fps shows
        await until(page, "() => Number(document.getElementById('video').dataset.frames) >= 3")
        before = await page.evaluate("document.getElementById('video').toDataURL()")
        await until(page, "before => document.getElementById('video').toDataURL() !== before", before)
        await until(page, "() => Number(document.getElementById('fps').dataset.fps) > 0")
        assert await page.evaluate("[document.getElementById('video').width, document.getElementById('video').height]"
                                   ) == [320, 240]

        # a motion detector raises an alert: it appears live, with its snapshot and its box
        ml_task = asyncio.create_task(run_ml(site.ws_url, service, "porch", cooldown_s=60, stop=stop))
        live = page.locator(f"#alerts li[data-seq='{earlier[-1] + 1}']")
        await expect(live).to_be_visible()
        await expect(live.locator(".object")).to_contain_text("motion")
        await expect(live.locator(".severity")).not_to_be_empty()
        await expect(live.locator("time")).not_to_be_empty()
        await until(
            page, "seq => { const img = document.querySelector(`#alerts li[data-seq='${seq}'] .thumb img`);"
            " return img && img.complete && img.naturalWidth === 320 && img.src.startsWith('blob:'); }",
            earlier[-1] + 1)
        box = await live.locator(".box").bounding_box()
        thumb = await live.locator(".thumb img").bounding_box()
        assert box and thumb and box["width"] > 0 and box["height"] > 0
        assert thumb["x"] <= box["x"] and box["x"] + box["width"] <= thumb["x"] + thumb["width"] + 1
        stop.set()  # ML service and camera stop: the stream goes offline, live
        await expect(page.locator("#view-status")).to_have_attribute("data-status", "offline")

        # the operator acknowledges the live alert; another operator acknowledges an earlier one elsewhere
        await live.locator("button.ack").click()
        await expect(live).to_have_class(re.compile(r"\backnowledged\b"))
        await expect(live.locator(".acked")).to_contain_text("root")
        earlier_alert = (await rest(site, "GET", "/api/streams/porch/alerts?limit=500", admin))["items"][-1]
        await rest(site, "POST", f"/api/alerts/{earlier_alert['alertId']}/ack", alice)
        first = page.locator(f"#alerts li[data-seq='{earlier[0]}']")
        await expect(first).to_have_class(re.compile(r"\backnowledged\b"))  # alert-acknowledged, live
        await expect(first.locator(".acked")).to_contain_text("alice")
        items = (await rest(site, "GET", "/api/streams/porch/alerts?limit=500", admin))["items"]
        assert {i["seq"]: (i["acknowledged"] or {}).get("by") for i in items}[earlier[-1] + 1] == "root"
        assert await shown_seqs(tab) == [i["seq"] for i in items]  # the page's list is the store's
        await page.screenshot(path=save_screenshot_path("dashboard-desktop.png"), full_page=True)
        tab.assert_clean()
    finally:
        stop.set()
        await asyncio.gather(camera, *([ml_task] if ml_task else []), return_exceptions=True)
        await tab.context.close()


async def test_page_reconnects_after_a_restart_and_shows_the_alerts_raised_meanwhile(
        site: Site, browser: Any, token: MakeToken, settings: Settings) -> None:
    from playwright.async_api import expect

    admin, service = token("root", role="admin"), token("detector", role="service", streams="*")
    await create_stream(site, token("alice"), "porch")
    await raise_alerts(site.ws_url, service, "porch", 2, prefix="before")
    tab = await open_dashboard(browser, site, admin, "porch")
    page = tab.page
    try:
        await expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
        await expect(page.locator("#alerts-state")).to_have_attribute("data-live", "true")
        await raise_alerts(site.ws_url, service, "porch", 1, prefix="live")
        await wait_for_seqs(tab, [3, 2, 1])

        await site.stop()  # every socket closed with 1001, as on SIGTERM
        await expect(page.locator("#connection")).to_have_attribute("data-state", re.compile("waiting|connecting"))
        await expect(page.locator("#connection")).to_contain_text("Reconnecting")
        # While this node is down, alerts keep being stored (by another node over the same database).
        other, close_other = await start_server(settings, site.store)
        try:
            meanwhile = await raise_alerts(other.ws_url, service, "porch", 2, prefix="meanwhile")
        finally:
            await close_other()
        assert meanwhile == [4, 5]
        await site.start()  # the same port again
        await raise_alerts(site.ws_url, service, "porch", 1, prefix="after")

        await expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
        await wait_for_seqs(tab, [6, 5, 4, 3, 2, 1])  # none missing, none twice
        assert await shown_seqs(tab) == await stored_seqs(site, admin, "porch")
        tab.assert_clean()
    finally:
        await tab.context.close()


# ----------------------------------------------------------------------------- bad tokens, deleted streams

async def test_a_refused_token_asks_to_sign_in_again_without_connecting(site: Site, browser: Any,
                                                                        token: MakeToken) -> None:
    from playwright.async_api import expect

    await create_stream(site, token("alice"), "porch")
    await create_stream(site, token("bob"), "garage")
    tab = await open_dashboard(browser, site, "not-a-jwt")
    page = tab.page
    try:
        await expect(page.locator("#sign-in")).to_be_visible()
        await expect(page.locator("#sign-in-message")).to_contain_text("refused (token-invalid)")
        assert await page.evaluate("sessionStorage.getItem('watchout.token')") is None
        assert tab.sockets == []  # no WebSocket, so no reconnect loop
        # signing in with a good token from the form: a user sees only their own streams
        await page.fill("#token-input", token("alice"))
        await page.click("#sign-in-form button[type=submit]")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
        await expect(page.locator("#streams li[data-stream-id=porch]")).to_be_visible()
        assert await page.locator("#streams li").count() == 1
        await expect(page.locator("#principal")).to_have_text("alice (user)")
        tab.assert_clean()
    finally:
        await tab.context.close()


async def test_a_token_that_expires_on_the_socket_stops_after_one_retry(
        site: Site, browser: Any, token: MakeToken) -> None:
    from playwright.async_api import expect

    await create_stream(site, token("alice"), "porch")
    tab = await open_dashboard(browser, site, token("alice", ttl_s=3), "porch")
    page = tab.page
    try:
        await expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
        # at exp + grace the server closes 4401 token-expired; the retry with the (same) stored token is refused
        await expect(page.locator("#sign-in")).to_be_visible()
        await expect(page.locator("#sign-in-message")).to_contain_text("Sign in again")
        await expect(page.locator("#sign-in-message")).to_contain_text("token-expired")
        assert len(tab.sockets) == 2  # the first, then one retry with the token from sessionStorage
        assert await page.evaluate("sessionStorage.getItem('watchout.token')") is None
        tab.assert_clean()
    finally:
        await tab.context.close()


async def test_a_deleted_stream_is_shown_as_deleted(site: Site, browser: Any, token: MakeToken) -> None:
    from playwright.async_api import expect

    alice = token("alice")
    await create_stream(site, alice, "shed")
    await create_stream(site, alice, "porch")
    tab = await open_dashboard(browser, site, alice, "shed")
    page = tab.page
    try:
        await expect(page.locator("#alerts-state")).to_have_attribute("data-live", "true")
        await rest(site, "DELETE", "/api/streams/shed", alice)  # its sockets are closed with 4410
        await expect(page.locator("#view-status")).to_have_attribute("data-status", "deleted")
        await expect(page.locator("#streams li[data-stream-id=shed]")).to_have_attribute("data-status", "deleted")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "ready")  # the others go on
        await page.click("#streams li[data-stream-id=porch] button")
        await expect(page.locator("#alerts-state")).to_have_attribute("data-live", "true")
        tab.assert_clean()
    finally:
        await tab.context.close()


# ----------------------------------------------------------------------------- a phone's window

async def test_narrow_phone_window_has_no_horizontal_overflow_and_usable_panels(site: Site, browser: Any,
                                                                                token: MakeToken) -> None:
    from playwright.async_api import expect

    admin, service = token("root", role="admin"), token("detector", role="service", streams="*")
    long_id = "porch-camera-with-a-rather-long-name-" + "x" * 40
    await create_stream(site, token("alice"), long_id)
    await create_stream(site, token("bob"), "garage")
    await raise_alerts(site.ws_url, service, long_id, 3, prefix="a-very-long-unbroken-message-" + "y" * 80,
                       snapshot=snapshot_jpeg())
    tab = await open_dashboard(browser, site, admin, long_id, viewport={"width": 390, "height": 844})
    page = tab.page
    try:
        await expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
        await wait_for_seqs(tab, [3, 2, 1])
        await until(page, "() => [...document.querySelectorAll('#alerts .thumb img')].length === 3 &&"
                          " [...document.querySelectorAll('#alerts .thumb img')].every(i => i.complete)")
        overflow = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert overflow[0] <= overflow[1], f"the page scrolls sideways: {overflow}"
        for panel in ("#streams-panel", "#view-panel", "#alerts-panel", "#video"):
            rect = await page.locator(panel).bounding_box()
            assert rect and rect["x"] >= 0 and rect["x"] + rect["width"] <= 390 and rect["width"] > 300, panel
        button = page.locator("#alerts li[data-seq='3'] button.ack")
        await button.scroll_into_view_if_needed()
        rect = await button.bounding_box()
        assert rect and rect["x"] + rect["width"] <= 390 and rect["height"] >= 30  # a finger can hit it
        await button.click()
        await expect(page.locator("#alerts li[data-seq='3']")).to_have_class(re.compile(r"\backnowledged\b"))
        await page.click("#streams li[data-stream-id=garage] button")
        await expect(page.locator("#view-title")).to_have_text("garage")
        await page.click(f"#streams li[data-stream-id='{long_id}'] button")
        await wait_for_seqs(tab, [3, 2, 1])
        await page.screenshot(path=save_screenshot_path("dashboard-phone.png"), full_page=True)
        tab.assert_clean()
    finally:
        await tab.context.close()


# ----------------------------------------------------------------------------- notification receipts

async def test_an_alert_shows_who_it_was_sent_to(site: Site, browser: Any, token: MakeToken) -> None:
    """The alert's Deliveries button lists its notifications: here a webhook out of reach (no internet on
    this machine), pending with its error after its first attempt."""
    from playwright.async_api import expect

    alice = token("alice")
    await create_stream(site, alice, "gate")
    hook = await rest(site, "POST", "/api/webhooks", alice, {"url": "https://example.com/watchout"})
    [seq] = await raise_alerts(site.ws_url, token("detector", role="service", streams=["gate"]), "gate", 1,
                               prefix="receipt")
    tab = await open_dashboard(browser, site, alice, "gate")
    page = tab.page
    try:
        item = page.locator(f"#alerts li[data-seq='{seq}']")
        await expect(item).to_be_visible()
        for _ in range(150):  # until the first attempt is recorded (it takes up to webhook_timeout_s, 5 s)
            alert_id = await item.get_attribute("data-alert-id")
            receipts = await rest(site, "GET", f"/api/alerts/{alert_id}/deliveries", alice)
            if receipts["items"] and receipts["items"][0]["attempts"]:
                break
            await asyncio.sleep(0.1)
        await item.locator("button.show-receipts").click()
        receipt = item.locator(f".receipts li[data-destination='{hook['id']}']")
        await expect(receipt).to_have_attribute("data-state", "pending")
        await expect(receipt).to_contain_text("webhook: pending, 1 attempt")
        await item.locator("button.show-receipts").click()
        await expect(item.locator(".receipts")).to_be_hidden()
        tab.assert_clean()
    finally:
        await tab.context.close()
        await rest(site, "DELETE", f"/api/webhooks/{hook['id']}", alice)
