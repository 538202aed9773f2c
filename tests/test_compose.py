"""docker/compose.yaml and docker/haproxy.cfg: the multi-node deployment, checked without a Docker engine.

Two nodes share MongoDB, Redis and one JWT key from the env file; the proxy routes WebSocket upgrades on
/ws to a node that answers /health with 200, holds tunnels open for long, and passes the headers through.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from watchout.settings import FIELDS, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
HAPROXY = DOCKER / "haproxy.cfg"
ENV_EXAMPLE = DOCKER / "watchout.env.example"
NODES = ("watchout-1", "watchout-2")
VARIABLE = re.compile(r"\$\{(\w+)(?::?[?-][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"#?(\w+)=(.*)", line)
        if match:
            values[match[1]] = match[2]
    return values


def _interpolate(value: str, env: dict[str, str]) -> str:
    """What compose makes of ${NAME:?message} and ${NAME:-default} with `env` as the env file."""
    def one(match: re.Match[str]) -> str:
        name, spec = match[1], match[0]
        if name in env:
            return env[name]
        default = re.match(r"\$\{\w+:?-(.*)\}", spec)
        assert default, f"{spec} is not set by {ENV_EXAMPLE.name}"
        return default[1]
    return VARIABLE.sub(one, value)


def _node_env(compose: dict[str, Any], node: str) -> dict[str, str]:
    return {k: str(v) for k, v in compose["services"][node]["environment"].items()}


def test_compose_has_mongo_redis_two_nodes_and_the_proxy(compose):
    services = compose["services"]
    assert set(services) == {"mongo", "redis", *NODES, "proxy"}
    assert services["mongo"]["image"].startswith("mongo:") and services["redis"]["image"].startswith("redis:")
    for node in NODES:
        service = services[node]
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert {name: dep["condition"] for name, dep in service["depends_on"].items()} == {
            "mongo": "service_healthy", "redis": "service_healthy"}
    assert {name: dep["condition"] for name, dep in services["proxy"]["depends_on"].items()} == {
        node: "service_healthy" for node in NODES}
    for name in ("mongo", "redis"):
        assert services[name]["healthcheck"]["test"]
        assert "ports" not in services[name]  # reachable from the nodes only
    assert [p.rsplit(":", 1)[1] for p in services["proxy"]["ports"]] == ["3000"]


def test_both_nodes_get_the_same_secret_from_the_env_file_and_their_own_node_id(compose):
    first, second = (_node_env(compose, node) for node in NODES)
    secret = first["WATCHOUT_JWT_SECRET"]
    variable = VARIABLE.fullmatch(secret)
    assert variable and variable[1] == "WATCHOUT_JWT_SECRET"
    assert second["WATCHOUT_JWT_SECRET"] == secret
    assert {k: v for k, v in first.items() if k != "WATCHOUT_NODE_ID"} == \
        {k: v for k, v in second.items() if k != "WATCHOUT_NODE_ID"}
    assert first["WATCHOUT_NODE_ID"] != second["WATCHOUT_NODE_ID"]
    # no secret written into the compose file itself: MongoDB's password comes from the env file too
    password = re.fullmatch(r"mongodb://\w+:(\$\{[^}]+\})@.*", first["WATCHOUT_MONGO_URL"])
    assert password and VARIABLE.fullmatch(password[1])[1] == "MONGO_PASSWORD"  # type: ignore[index]


def test_the_nodes_point_at_the_compose_mongo_and_redis(compose):
    env = _env_example()
    for node in NODES:
        settings = _node_env(compose, node)
        mongo = urllib.parse.urlsplit(_interpolate(settings["WATCHOUT_MONGO_URL"], env))
        broker = urllib.parse.urlsplit(_interpolate(settings["WATCHOUT_BROKER_URL"], env))
        assert mongo.scheme == "mongodb" and mongo.hostname == "mongo" and mongo.port == 27017
        assert mongo.username == compose["services"]["mongo"]["environment"]["MONGO_INITDB_ROOT_USERNAME"]
        assert mongo.password == env["MONGO_PASSWORD"]
        assert broker.scheme == "redis" and broker.hostname == "redis" and broker.port == 6379
        assert {mongo.hostname, broker.hostname} <= set(compose["services"])


def test_every_variable_comes_from_the_example_env_file_and_the_settings_are_valid(compose):
    env = _env_example()
    used = set(VARIABLE.findall(COMPOSE.read_text()))
    assert used <= set(env), f"not in {ENV_EXAMPLE.name}: {used - set(env)}"
    assert [n for n in env if n.startswith("WATCHOUT_") and n[len("WATCHOUT_"):].lower() not in FIELDS] == \
        ["WATCHOUT_PUBLIC_PORT"]  # the host port, for compose only
    for node in NODES:
        settings = load_settings(None, {k: _interpolate(v, env) for k, v in _node_env(compose, node).items()})
        assert settings.broker_url and settings.mongo_url and settings.jwt_secret
    assert "docker/watchout.env" in (ROOT / ".gitignore").read_text().splitlines()


def _haproxy() -> tuple[dict[str, list[str]], str]:
    """Sections of haproxy.cfg ('frontend watchout': its lines, comments dropped), and the whole text."""
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in HAPROXY.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not raw.startswith((" ", "\t")):
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(" ".join(line.split()))
    return sections, HAPROXY.read_text()


def test_compose_mounts_the_proxy_config():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    source, target = services["proxy"]["volumes"][0].split(":")[:2]
    assert (COMPOSE.parent / source).resolve() == HAPROXY and target == "/usr/local/etc/haproxy/haproxy.cfg"


def test_the_proxy_routes_websocket_upgrades_on_ws_to_healthy_nodes():
    sections, _ = _haproxy()
    frontend = sections["frontend watchout"]
    assert "bind :3000" in frontend
    acls = {line.split()[1]: " ".join(line.split()[2:]) for line in frontend if line.startswith("acl ")}
    routes = [line for line in frontend if line.startswith("use_backend ")]
    assert len(routes) == 1
    backend, condition = routes[0].split()[1], routes[0].split(" if ")[1].split()
    assert {acls[name] for name in condition} == {"path /ws", "hdr(Upgrade) -i websocket",
                                                  "hdr_sub(Connection) -i upgrade"}
    ws = sections[f"backend {backend}"]
    assert "balance leastconn" in ws
    assert "option httpchk" in ws and "http-check send meth GET uri /health" in ws
    assert "http-check expect status 200" in ws  # 503 (the store is away) takes a node out; degraded stays
    servers = {line.split()[1]: line.split()[2:] for line in ws if line.startswith("server ")}
    assert {name: args[0] for name, args in servers.items()} == {node: f"{node}:3000" for node in NODES}
    assert all("check" in args for args in servers.values())
    default = [line.split()[1] for line in frontend if line.startswith("default_backend ")]
    http = sections[f"backend {default[0]}"]  # everything else: REST, /health, /stats, the dashboard
    assert {line.split()[2] for line in http if line.startswith("server ")} == {f"{node}:3000" for node in NODES}


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 0.001}[unit]


def test_the_proxy_keeps_websockets_open_longer_than_the_server_pings():
    sections, _ = _haproxy()
    timeouts = {line.split()[1]: _seconds(line.split()[2]) for line in sections["defaults"]
                if line.startswith("timeout ")}
    ping = Settings().ws_ping_interval_s
    assert timeouts["tunnel"] >= 3600 > ping  # an upgraded connection is a tunnel
    assert timeouts["client"] > ping and timeouts["server"] > ping
    assert "mode http" in sections["defaults"]


def test_haproxy_accepts_the_config():
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    result = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY)], capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # outside compose the node names do not resolve: the only warnings allowed say so
    warnings = [line for line in output.splitlines() if "[WARNING]" in line]
    assert all("could not resolve address" in line for line in warnings), output
