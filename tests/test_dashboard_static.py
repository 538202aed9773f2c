"""The dashboard's static files under hostile paths: each answers 400 or 404, and nothing is logged as an error.

Requests go over a raw socket, so the request line reaches the server exactly as written (an HTTP client
might normalise `..` or refuse a NUL escape).
"""
from __future__ import annotations

import asyncio
import logging

import pytest

from conftest import Server


async def get_status(server: Server, target: str, method: str = "GET") -> int:
    """The status code of `method target`, the request target sent byte for byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


HOSTILE = {
    "nul-after-a-real-name": "/dashboard/index.html%00.js",
    "nul-alone": "/dashboard/%00",
    "nul-in-a-directory": "/dashboard/%00/index.html",
    "dot-dot": "/dashboard/../setup.py",
    "dot-dot-alone": "/dashboard/..",
    "dot-dot-encoded": "/dashboard/%2e%2e/__init__.py",
    "dot-dot-encoded-slash": "/dashboard/..%2f__init__.py",
    "dot-dot-backslash": "/dashboard/..%5c__init__.py",
    "overlong-utf8-dots": "/dashboard/%c0%ae%c0%ae/__init__.py",
    "absolute-path": "/dashboard//etc/passwd",
    "absolute-path-encoded": "/dashboard/%2fetc%2fpasswd",
    "encoded-slash": "/dashboard/app.js%2f",
    "trailing-slash": "/dashboard/index.html/",
    "dot": "/dashboard/.",
    "dot-then-name": "/dashboard/./index.html",
    "subdirectory": "/dashboard/a/b.js",
    "very-long-name": "/dashboard/" + "a" * 5000 + ".js",
    "name-past-the-file-system-limit": "/dashboard/" + "a" * 300,
    "very-deep": "/dashboard/" + "a/" * 2000 + "index.html",
    "invalid-percent-escape": "/dashboard/%zz",
    "truncated-percent-escape": "/dashboard/index.html%",
    "invalid-utf8": "/dashboard/%ff.js",
    "truncated-utf8": "/dashboard/%e0%a4",
    "newline": "/dashboard/index.html%0a",
    "windows-drive": "/dashboard/C:%5cwindows",
}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("target", HOSTILE.values(), ids=HOSTILE.keys())
async def test_a_hostile_dashboard_path_answers_400_or_404_and_logs_no_error(
        server: Server, caplog: pytest.LogCaptureFixture, target: str, method: str) -> None:
    caplog.set_level(logging.WARNING)
    assert await get_status(server, target, method) in (400, 404)
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"


async def test_the_dashboard_files_are_still_served(server: Server) -> None:
    for target in ("/dashboard/", "/dashboard/index.html", "/dashboard/app.js", "/dashboard/watchout-client.js",
                   "/dashboard/style.css"):
        assert await get_status(server, target) == 200, target
