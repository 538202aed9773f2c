"""What an install (and the Docker image) gets: a complete wheel with runtime dependencies only."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_every_package_and_data_file_and_no_test_dependency(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=300, capture_output=True)
    wheel = next(tmp_path.glob("watchout-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for module in ("watchout/cli.py", "watchout/store/__init__.py", "watchout/store/sqlite.py",
                   "watchout/store/mongo.py", "watchout/store/dbthread.py", "handlers/socket.py",
                   "handlers/openapi.json",
                   "workers/__init__.py", "watchout/py.typed", "handlers/dashboard.py",
                   *(f"watchout/dashboard/{page.name}" for page in (ROOT / "watchout" / "dashboard").iterdir())):
        assert module in names, module
    unconditional = [line for line in metadata.splitlines()
                     if line.startswith("Requires-Dist:") and "extra ==" not in line]
    required = {re.split(r"[\s<>=!\[;(]", line.split(":", 1)[1].strip())[0].lower() for line in unconditional}
    assert {"tornado", "pyjwt", "motor", "pymongo", "orjson", "pybase64"} <= {r.replace("_", "-") for r in required}
    # mongomock-motor is the tests' stand-in for MongoDB, never the service's store
    assert not required & {"pytest", "pytest-asyncio", "websockets", "mypy", "flake8", "playwright", "mongomock-motor",
                           "mongomock"}
    assert "watchout = watchout.cli:main" in entry_points


def test_dockerfile_runs_the_console_script_as_a_non_root_user_with_a_health_check():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^USER watchout$", dockerfile, re.M)
    assert 'ENTRYPOINT ["watchout"]' in dockerfile and 'CMD ["serve"]' in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/health" in dockerfile
    assert "[test]" not in dockerfile.replace("no [test] extras", "")
