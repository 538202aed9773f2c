"""The simulators: the motion detector on drawn frames, camera + detector against the real server, their
progress lines, `watchout demo`."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from io import BytesIO

import pytest
import tornado.httpclient

pytest.importorskip("PIL", reason="the simulators need Pillow (the [sim] and [test] extras)")

from PIL import Image, ImageDraw  # noqa: E402

from conftest import artifacts_dir, chromium_missing, launch_chromium, require_services  # noqa: E402
from test_service import _free_port  # noqa: E402
from watchout.simulators import MotionDetector, render_frame, run_camera, run_ml  # noqa: E402


def _jpeg(box: tuple[int, int, int, int] | None, size: tuple[int, int] = (320, 240)) -> bytes:
    image = Image.new("RGB", size, (30, 40, 50))
    if box is not None:
        ImageDraw.Draw(image).rectangle(box, fill=(250, 250, 250))
    out = BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def test_still_frames_raise_no_alert_and_a_moved_object_is_boxed():
    detector = MotionDetector(cooldown_s=0.0)
    still = _jpeg((40, 40, 80, 80))
    assert detector(still) is None  # the first frame has nothing to compare with
    assert detector(still) is None
    assert detector(_jpeg((40, 40, 80, 80))) is None
    detection = detector(_jpeg((200, 120, 260, 180)))
    assert detection is not None and detection.snapshot is not None
    meta = detection.metadata
    assert meta["objectType"] == "motion" and 0 < meta["confidence"] <= 1
    assert detection.severity in ("low", "medium", "high")
    box = meta["box"]
    # The box covers where the object was and where it is now (within the downsampling's few pixels).
    assert box["x"] <= 42 and box["y"] <= 42
    assert box["x"] + box["w"] >= 258 and box["y"] + box["h"] >= 178
    assert box["x"] + box["w"] <= 270 and box["y"] + box["h"] <= 190


def test_alerts_wait_for_the_cooldown():
    now = [100.0]
    detector = MotionDetector(cooldown_s=5.0, clock=lambda: now[0])
    frames = [_jpeg((10 + 40 * i, 10, 50 + 40 * i, 50)) for i in range(5)]
    assert detector(frames[0]) is None
    assert detector(frames[1]) is not None
    now[0] += 1.0
    assert detector(frames[2]) is None  # motion, but within the cooldown
    now[0] += 5.0
    assert detector(frames[3]) is not None


def test_camera_frames_are_jpegs_of_the_chosen_size_with_a_moving_object():
    first, later = render_frame(1_764_000_000.0, 320, 240), render_frame(1_764_000_000.5, 320, 240)
    with Image.open(BytesIO(first)) as image:
        assert image.format == "JPEG" and image.size == (320, 240)
    detector = MotionDetector(cooldown_s=0.0)
    detector(first)
    assert detector(later) is not None


async def test_camera_and_detector_store_a_motion_alert_with_a_snapshot(server, token, api, capsys):
    stop, registered = asyncio.Event(), asyncio.Event()
    camera = asyncio.create_task(run_camera(server.ws_url, token("cam-owner"), "sim-cam", fps=10, size=(320, 240),
                                            stop=stop, ready=registered))
    await asyncio.wait_for(registered.wait(), 5)
    ml = asyncio.create_task(run_ml(server.ws_url, token("detector", role="service", streams=["sim-cam"]), "sim-cam",
                                    stop=stop))
    try:
        alerts: list[dict] = []
        for _ in range(100):
            response = await api("GET", "/api/streams/sim-cam/alerts", token=token("cam-owner"))
            alerts = response.json["items"]
            if alerts:
                break
            await asyncio.sleep(0.1)
        assert alerts, "no alert stored"
        alert = alerts[0]
        assert alert["metadata"]["objectType"] == "motion"
        assert set(alert["metadata"]["box"]) == {"x", "y", "w", "h"}
        snapshot = await api("GET", alert["snapshotUrl"], token=token("cam-owner"))
        assert snapshot.status == 200 and snapshot.body.startswith(b"\xff\xd8")
    finally:
        stop.set()
        assert await asyncio.wait_for(asyncio.gather(camera, ml), 10) == [None, None]
    assert capsys.readouterr().out == ""  # no progress_s: silent, as in `watchout demo`


CAMERA_LINE = re.compile(r"camera sim-cam: (\d+) frames? sent \((\d+\.\d) fps\), (\w+)")
CAMERA_LAST = re.compile(r"camera sim-cam: (\d+) frames? sent in \d+\.\d s \((\d+\.\d) fps\), stopped")
ML_LINE = re.compile(r"ml sim-cam: (\d+) frames? seen, (\d+) alerts? raised, (\d+) acked, (\w+)")


async def test_camera_and_detector_print_a_progress_line_every_interval_and_one_at_the_end(server, token, capsys):
    stop, registered = asyncio.Event(), asyncio.Event()
    camera = asyncio.create_task(run_camera(server.ws_url, token("cam-owner"), "sim-cam", fps=10, size=(320, 240),
                                            stop=stop, ready=registered, progress_s=0.2))
    await asyncio.wait_for(registered.wait(), 5)
    ml = asyncio.create_task(run_ml(server.ws_url, token("detector", role="service", streams=["sim-cam"]), "sim-cam",
                                    stop=stop, progress_s=0.2))
    output = ""
    try:
        for _ in range(100):  # until the detector reports an acknowledged alert, and a few lines are out
            await asyncio.sleep(0.1)
            output += capsys.readouterr().out
            if len(CAMERA_LINE.findall(output)) >= 3 and any(int(m.group(3)) > 0 for m in ML_LINE.finditer(output)):
                break
    finally:
        stop.set()
        assert await asyncio.wait_for(asyncio.gather(camera, ml), 10) == [None, None]
    lines = (output + capsys.readouterr().out).splitlines()
    camera_lines = [m for m in map(CAMERA_LINE.fullmatch, lines) if m]
    ml_lines = [m for m in map(ML_LINE.fullmatch, lines) if m]
    assert len(camera_lines) >= 2 and len(ml_lines) >= 2, lines
    sent = [int(m.group(1)) for m in camera_lines]
    assert sent == sorted(sent) and sent[-1] > 0
    assert camera_lines[-1].group(3) == "connected" and any(0 < float(m.group(2)) <= 20 for m in camera_lines)
    assert any(int(m.group(3)) > 0 and m.group(4) == "connected" for m in ml_lines)
    last_camera = CAMERA_LAST.fullmatch([line for line in lines if line.startswith("camera ")][-1])
    last_ml = ML_LINE.fullmatch([line for line in lines if line.startswith("ml ")][-1])
    assert last_camera is not None and int(last_camera.group(1)) >= sent[-1], lines
    assert last_ml is not None and last_ml.group(4) == "stopped", lines


async def test_simulate_command_prints_its_progress_on_stdout(server, token):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watchout", "simulate", "camera", "--url", server.ws_url, "--token", token("cam-owner"),
        "--stream", "sim-cam", "--fps", "10", "--size", "160x120", "--seconds", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    last = CAMERA_LAST.fullmatch(out.decode().strip().splitlines()[-1])
    assert last and int(last.group(1)) > 0, out.decode()


async def _get(url: str, admin: str) -> dict:
    request = tornado.httpclient.HTTPRequest(url, headers={"Authorization": f"Bearer {admin}"})
    return json.loads((await tornado.httpclient.AsyncHTTPClient().fetch(request)).body)


async def _dashboard_shows_a_demo_alert(link: str) -> None:
    """Open the demo's dashboard link in Chromium: signed in, the camera's frames, then a motion alert."""
    from playwright.async_api import async_playwright, expect

    async with async_playwright() as playwright:
        browser = await launch_chromium(playwright)
        try:
            page = await browser.new_page()
            await page.goto(link)
            assert "token" not in page.url
            await expect(page.locator("#connection")).to_have_attribute("data-state", "ready", timeout=10_000)
            await expect(page.locator("#view-status")).to_have_attribute("data-status", "streaming")
            alert = page.locator("#alerts li").first
            await expect(alert.locator(".object")).to_contain_text("motion", timeout=10_000)
            await expect(alert.locator(".thumb img")).to_have_attribute("src", re.compile("^blob:"))
            await expect(page.locator("#video")).not_to_have_attribute("data-frames", "0")
            await page.screenshot(path=str(artifacts_dir() / "demo-dashboard.png"))
        finally:
            await browser.close()


async def test_demo_serves_alerts_and_its_dashboard_and_stops_on_sigint():
    """Also opens the printed dashboard link in Chromium when Playwright and /usr/bin/chromium are there
    (always in CI: WATCHOUT_REQUIRE_SERVICES=1); tests/test_dashboard.py covers the page itself."""
    missing = chromium_missing()
    if missing and require_services():
        pytest.fail(f"WATCHOUT_REQUIRE_SERVICES=1 but {missing}")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHOUT_")}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "watchout", "demo", "--port", str(port),
                                                env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        while not any("Ctrl+C" in line for line in lines):
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line, "watchout demo exited early:\n" + "".join(lines)
            lines.append(line)
        output = "".join(lines)
        assert f"ws://127.0.0.1:{port}/ws" in output and f"http://127.0.0.1:{port}/api/alerts" in output
        assert f"Dashboard: http://127.0.0.1:{port}/dashboard/#token=eyJ" in output
        link = re.search(rf"http://127\.0\.0\.1:{port}/dashboard/#stream=demo-cam&token=eyJ\S+", output)
        assert link, output
        # The printed curl commands use $TOKEN: a line before them sets it, ready to paste.
        pasted = re.search(r"^ +TOKEN=(eyJ[\w-]+\.[\w-]+\.[\w-]+)\n +curl -H \"Authorization: Bearer \$TOKEN\" ",
                           output, re.M)
        assert pasted, output
        admin = pasted.group(1)
        alerts: list[dict] = []
        for _ in range(100):
            alerts = (await _get(f"http://127.0.0.1:{port}/api/alerts", admin))["items"]
            if alerts:
                break
            await asyncio.sleep(0.1)
        assert alerts and alerts[0]["metadata"]["objectType"] == "motion" and "box" in alerts[0]["metadata"]
        assert (await _get(f"http://127.0.0.1:{port}/stats", admin))["totalProducers"] == 1
        page = await tornado.httpclient.AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/dashboard/")
        assert b'<script type="module" src="app.js">' in page.body and "script-src 'self'" in \
            page.headers["Content-Security-Policy"]
        if not missing:
            await _dashboard_shows_a_demo_alert(link.group(0))
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert "frames sent" not in (await proc.stdout.read()).decode()  # the demo prints no progress lines
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_simulate_without_pillow_exits_2_and_names_the_extra(tmp_path):
    shadow = tmp_path / "PIL"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('no Pillow here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "watchout", "demo", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert b"pip install 'watchout[sim]'" in out and b"Traceback" not in out
