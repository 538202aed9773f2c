"""Simulators built on the client SDK: a synthetic camera (Producer) and a motion detector (MLService).

`watchout simulate camera|ml` run one of them against any Watchout, printing a progress line every
PROGRESS_S seconds; `watchout demo` runs both inside the embedded server (see demo_companion), without
progress lines. Frames are drawn and decoded with Pillow, an optional dependency
(`pip install 'watchout[sim]'`); watchout.cli checks for it before importing this module.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from io import BytesIO

from PIL import Image, ImageChops, ImageDraw

from watchout.auth import mint_token
from watchout.client import Connection, Detection, MLService, Producer, State, WatchoutClientError
from watchout.settings import Settings

log = logging.getLogger("watchout.simulators")
DEMO_STREAM = "demo-cam"
DEMO_TOKEN_TTL_S = 24 * 3600
READY_TIMEOUT_S = 10.0
PROGRESS_S = 5.0  # `watchout simulate`: seconds between progress lines


# ----------------------------------------------------------------------------- camera

def render_frame(t_s: float, width: int, height: int, quality: int = 80) -> bytes:
    """A JPEG: a still background, a ball bouncing across it (position from `t_s`), and the time of day."""
    image = Image.new("RGB", (width, height), (32, 48, 64))
    draw = ImageDraw.Draw(image)
    for x in range(0, width, max(width // 8, 1)):  # a static grid, so the background is not blank
        draw.line([(x, 0), (x, height)], fill=(44, 62, 80))
    radius = max(min(width, height) // 10, 2)
    x = _bounce(t_s * width / 3.0, width - 2 * radius)  # crosses the frame in about 3 s
    y = _bounce(t_s * height / 4.0, height - 2 * radius)
    draw.ellipse([x, y, x + 2 * radius, y + 2 * radius], fill=(240, 180, 40))
    stamp = dt.datetime.fromtimestamp(t_s).strftime("%Y-%m-%d %H:%M:%S")
    draw.text((8, height - 18), f"watchout sim {stamp}", fill=(230, 230, 230))
    out = BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _bounce(distance: float, span: int) -> int:
    """A position in 0..span moving back and forth `distance` pixels along it."""
    if span <= 0:
        return 0
    phase = distance % (2 * span)
    return int(phase if phase <= span else 2 * span - phase)


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480); raises ValueError outside 16..4096 pixels a side."""
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit() and 16 <= int(width) <= 4096 and 16 <= int(height) <= 4096):
        raise ValueError(f"{text!r} is not WIDTHxHEIGHT, 16..4096 pixels each")
    return int(width), int(height)


async def run_camera(url: str, token: str, stream_id: str, *, fps: float = 5.0, size: tuple[int, int] = (640, 480),
                     seconds: float | None = None, stop: asyncio.Event | None = None,
                     ready: asyncio.Event | None = None,
                     progress_s: float | None = None) -> WatchoutClientError | None:
    """Stream drawn frames until `seconds` pass, `stop` is set, or the producer closes for good (its error).

    Frames are encoded in the default executor, so the loop stays free; `ready` is set once registered.
    `progress_s`: print a CameraProgress line to stdout every so many seconds, and one at the end (None: silent).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    interval_s = 1.0 / fps
    producer = Producer(url, token, stream_id, alerts=False)
    async with _printing(CameraProgress(producer), progress_s), producer:
        try:
            await producer.wait_ready(READY_TIMEOUT_S)
        except (WatchoutClientError, TimeoutError) as exc:
            log.error("camera: not registered on %s: %s", stream_id, exc)
            return exc if isinstance(exc, WatchoutClientError) else WatchoutClientError(str(exc))
        if ready is not None:
            ready.set()
        end = loop.time() + seconds if seconds is not None else math.inf
        due = loop.time()
        while not stop.is_set() and loop.time() < end and producer.state != "closed":
            jpeg = await loop.run_in_executor(None, render_frame, time.time(), *size)
            producer.send_frame(jpeg, width=size[0], height=size[1])
            due = max(due + interval_s, loop.time())
            await _wait(stop, min(due, end) - loop.time())
        return producer.error


# ----------------------------------------------------------------------------- motion detector

@dataclass(frozen=True, slots=True)
class Motion:
    """Changed pixels between two frames: the box (x, y, w, h) in the frame's pixels and the changed fraction."""

    box: tuple[int, int, int, int]
    changed: float
    confidence: float


class MotionDetector:
    """Motion by frame differencing: grayscale, downsample, |this - previous| > threshold, bounding box.

    Call it with each JPEG (from one thread at a time: MLService runs it in its one-thread executor). It
    returns a Detection (snapshot: that JPEG) when at least `min_changed` of the pixels changed, and at
    most one every `cooldown_s` seconds. Confidence grows with the changed fraction: 0.5 at `half_at`.
    """

    def __init__(self, *, threshold: int = 25, min_changed: float = 0.003, half_at: float = 0.01,
                 cooldown_s: float = 5.0, work_width: int = 160, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.min_changed = min_changed
        self.half_at = half_at
        self.cooldown_s = cooldown_s
        self.work_width = work_width
        self.clock = clock
        self._previous: Image.Image | None = None
        self._last_alert: float | None = None

    def __call__(self, jpeg: bytes) -> Detection | None:
        with Image.open(BytesIO(jpeg)) as image:
            size = image.size
            gray = image.convert("L")
        scale = max(size[0] / self.work_width, 1.0)
        small = gray.resize((max(int(size[0] / scale), 1), max(int(size[1] / scale), 1)), Image.Resampling.BILINEAR)
        previous, self._previous = self._previous, small
        if previous is None or previous.size != small.size:
            return None
        motion = self.compare(previous, small, scale)
        if motion is None:
            return None
        now = self.clock()
        if self._last_alert is not None and now - self._last_alert < self.cooldown_s:
            return None
        self._last_alert = now
        x, y, w, h = motion.box
        severity = "high" if motion.confidence >= 0.8 else "medium" if motion.confidence >= 0.5 else "low"
        return Detection(f"motion detected ({motion.changed:.1%} of the frame)", severity=severity,
                         metadata={"confidence": motion.confidence, "objectType": "motion",
                                   "box": {"x": x, "y": y, "w": w, "h": h}},
                         snapshot=jpeg)

    def compare(self, before: Image.Image, after: Image.Image, scale: float = 1.0) -> Motion | None:
        """The motion between two grayscale images of one size; None below `min_changed`. `scale`: to frame pixels."""
        mask = ImageChops.difference(before, after).point(lambda p: 255 if p > self.threshold else 0)
        changed = mask.histogram()[255] / (mask.width * mask.height)
        box = mask.getbbox()
        if box is None or changed < self.min_changed:
            return None
        left, top, right, bottom = (int(round(v * scale)) for v in box)
        confidence = round(changed / (changed + self.half_at), 3)
        return Motion((left, top, right - left, bottom - top), round(changed, 4), confidence)


async def run_ml(url: str, token: str, stream_id: str, *, cooldown_s: float = 5.0, seconds: float | None = None,
                 stop: asyncio.Event | None = None, progress_s: float | None = None) -> WatchoutClientError | None:
    """Detect motion on `stream_id` until `seconds` pass, `stop` is set, or the service closes for good.

    `progress_s`: print an MLProgress line to stdout every so many seconds, and one at the end (None: silent).
    """
    stop = stop or asyncio.Event()
    detector = MotionDetector(cooldown_s=cooldown_s)
    service = MLService(url, token, stream_id, detector)
    async with _printing(MLProgress(service), progress_s), service:
        closed = asyncio.ensure_future(service.wait_closed())
        stopped = asyncio.ensure_future(stop.wait())
        waiters = {closed, stopped}
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        log.info("ml: %d frames analysed, %d alerts sent", service.frames_analysed, service.alerts_sent)
        return service.error


async def _wait(stop: asyncio.Event, delay_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(delay_s, 0.0))


# ----------------------------------------------------------------------------- progress lines

_STATE_WORDS: dict[State, str] = {"idle": "connecting", "connecting": "connecting", "open": "connecting",
                                  "ready": "connected", "waiting": "reconnecting", "closed": "closed"}


def _connection_word(client: Connection, final: bool) -> str:
    """How the client is doing, in a word; at the end (the client closed): stopped, or closed by the server."""
    if final:
        return "closed by the server" if client.error is not None else "stopped"
    return _STATE_WORDS[client.state]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class CameraProgress:
    """Progress lines of a simulated camera: `camera porch: 25 frames sent (5.0 fps), connected`.

    The fps of a line counts the frames sent since the previous line; the last line's, the whole run's.
    """

    def __init__(self, producer: Producer, clock: Callable[[], float] = time.monotonic) -> None:
        self.producer = producer
        self.clock = clock
        self.started_at = self.last_at = clock()
        self.last_sent = 0

    def __call__(self, final: bool) -> str:
        now, sent = self.clock(), self.producer.frames_sent
        if final:
            elapsed_s = now - self.started_at
            fps = sent / elapsed_s if elapsed_s > 0 else 0.0
            figures = f"{_plural(sent, 'frame')} sent in {elapsed_s:.1f} s ({fps:.1f} fps)"
        else:
            elapsed_s = now - self.last_at
            fps = (sent - self.last_sent) / elapsed_s if elapsed_s > 0 else 0.0
            figures = f"{_plural(sent, 'frame')} sent ({fps:.1f} fps)"
        self.last_at, self.last_sent = now, sent
        return f"camera {self.producer.stream_id}: {figures}, {_connection_word(self.producer, final)}"


class MLProgress:
    """Progress lines of a simulated detector: `ml porch: 120 frames seen, 3 alerts raised, 3 acked, connected`."""

    def __init__(self, service: MLService) -> None:
        self.service = service

    def __call__(self, final: bool) -> str:
        service = self.service
        return (f"ml {service.stream_id}: {_plural(service.frames_received, 'frame')} seen, "
                f"{_plural(service.alerts_sent, 'alert')} raised, {service.alerts_acked} acked, "
                f"{_connection_word(service, final)}")


@contextlib.asynccontextmanager
async def _printing(line: Callable[[bool], str], every_s: float | None) -> AsyncIterator[None]:
    """Print `line(False)` every `every_s` seconds while the body runs, then `line(True)` (None: print nothing)."""
    if every_s is None:
        yield
        return

    async def tick() -> None:
        while True:
            await asyncio.sleep(every_s)
            print(line(False), flush=True)

    ticking = asyncio.create_task(tick())
    try:
        yield
    finally:
        ticking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticking
        print(line(True), flush=True)


# ----------------------------------------------------------------------------- commands

def simulate(role: str, url: str, token: str, stream_id: str, *, fps: float, size: str, cooldown_s: float,
             seconds: float | None, progress_s: float = PROGRESS_S) -> int:
    """`watchout simulate camera|ml`: 0 after --seconds or SIGINT/SIGTERM, 1 refused for good, 2 bad usage.

    Prints a progress line to stdout every `progress_s` seconds, and one when it stops.
    """
    try:
        frame_size = parse_size(size)
    except ValueError as exc:
        print(f"watchout: --size: {exc}", file=sys.stderr)
        return 2
    if fps <= 0 or fps > 60:
        print("watchout: --fps must be in (0, 60]", file=sys.stderr)
        return 2

    async def run() -> WatchoutClientError | None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if role == "camera":
            return await run_camera(url, token, stream_id, fps=fps, size=frame_size, seconds=seconds, stop=stop,
                                    progress_s=progress_s)
        return await run_ml(url, token, stream_id, cooldown_s=cooldown_s, seconds=seconds, stop=stop,
                            progress_s=progress_s)

    error = asyncio.run(run())
    if error is not None:
        print(f"watchout: {role} stopped: {error}", file=sys.stderr)
        return 1
    return 0


def demo_companion(fps: float) -> Callable[[Settings, str], contextlib.AbstractAsyncContextManager[None]]:
    """For serve(): once it listens, run a camera and a motion detector against it; stop them on exit.

    The simulators print no progress lines here (the dashboard and /stats show their figures); the
    printed `curl` commands come after a `TOKEN=...` line (an admin token) that can be pasted with them.
    """

    @contextlib.asynccontextmanager
    async def companion(settings: Settings, ws_url: str) -> AsyncIterator[None]:
        key = settings.jwt_secret
        camera_token = mint_token(key, "HS256", "demo", "user", ttl_s=DEMO_TOKEN_TTL_S)
        ml_token = mint_token(key, "HS256", "demo-ml", "service", streams=[DEMO_STREAM], ttl_s=DEMO_TOKEN_TTL_S)
        stop, registered = asyncio.Event(), asyncio.Event()
        camera = asyncio.create_task(run_camera(ws_url, camera_token, DEMO_STREAM, fps=fps, stop=stop,
                                                ready=registered))
        # The stream exists once the camera has registered; an earlier subscribe would wait 7 s to retry.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(registered.wait(), READY_TIMEOUT_S)
        ml = asyncio.create_task(run_ml(ws_url, ml_token, DEMO_STREAM, stop=stop))
        base = ws_url.replace("ws://", "http://", 1).removesuffix("/ws")
        # The token rides in the URL's #fragment: browsers never send it to the server (nor to its logs).
        dashboard_token = mint_token(key, "HS256", "demo", "user", ttl_s=DEMO_TOKEN_TTL_S)
        admin_token = mint_token(key, "HS256", "admin", "admin", ttl_s=DEMO_TOKEN_TTL_S)
        print("\n".join([
            f"Demo: a simulated camera streams {DEMO_STREAM!r} (640x480, {fps:g} fps) as user 'demo';",
            "  a motion detector (service 'demo-ml') watches it and raises alerts with a box and a snapshot.",
            "  Alert history, as admin (paste these lines into a shell):",
            f"    TOKEN={admin_token}",
            f"    curl -H \"Authorization: Bearer $TOKEN\" {base}/api/alerts",
            f"    curl -H \"Authorization: Bearer $TOKEN\" {base}/api/streams/{DEMO_STREAM}/alerts",
            "  Watch it in the web dashboard, signed in as 'demo' (the camera's owner):",
            f"    {base}/dashboard/#stream={DEMO_STREAM}&token={dashboard_token}",
            "Press Ctrl+C to stop."]), flush=True)
        try:
            yield
        finally:
            stop.set()
            for result in await asyncio.gather(camera, ml, return_exceptions=True):
                if isinstance(result, BaseException):
                    log.error("demo simulator failed: %r", result)

    return companion
