"""docker-compose.yml (the production shape) is checked here, since no Docker engine runs in
the tests: it parses, has the services the design names, runs only `agora` commands that
exist, and passes only settings that exist, with values that parse."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import Settings, describe
from gateway.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = compose["services"]
    return out


def agora_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in services(compose).items()
        if isinstance(svc.get("command"), list) and svc["command"][:1] == ["agora"]
    }


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?error}, with VAR unset (what a fresh host has)."""

    def sub(m: re.Match[str]) -> str:
        op, arg = m.group(2), m.group(3) or ""
        return arg if op == ":-" else "set-by-operator"

    return re.sub(r"\$\{([A-Z0-9_]+)(:-|:\?)?([^}]*)\}", sub, value)


def test_it_has_the_production_shape(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    images = {name: str(s.get("image", "")) for name, s in svcs.items()}
    kafka = [n for n, i in images.items() if i.startswith("apache/kafka")]
    assert len(kafka) == 1
    roles = str(svcs[kafka[0]]["environment"]["KAFKA_PROCESS_ROLES"])
    assert "controller" in roles and "broker" in roles  # KRaft: no ZooKeeper service
    assert not any("zookeeper" in i for i in images.values())
    assert any(i.startswith("redis") for i in images.values())
    assert len([i for i in images.values() if i.startswith("postgres")]) >= 2
    commands = {n: s["command"][1] for n, s in agora_services(compose).items()}
    assert list(commands.values()).count("gateway") >= 2
    assert {"fanout", "scores", "migrate"} <= set(commands.values())
    migrate = next(n for n, c in commands.items() if c == "migrate")
    for name, svc in agora_services(compose).items():
        if name != migrate:
            cond = svc["depends_on"][migrate]["condition"]
            assert cond == "service_completed_successfully", name


def test_every_agora_command_exists_in_the_cli(compose: dict[str, Any]) -> None:
    parser = build_parser()
    checked = 0
    for name, svc in agora_services(compose).items():
        try:
            parser.parse_args(svc["command"][1:])
        except SystemExit:
            pytest.fail(f"{name}: `{' '.join(svc['command'])}` is not a valid agora command")
        checked += 1
    assert checked >= 5  # migrate, two gateways, fanout, scores


def test_every_setting_is_known_and_parses(compose: dict[str, Any]) -> None:
    known = {name for name, _, _ in describe()}
    for name, svc in agora_services(compose).items():
        env = {k: _interpolate(str(v)) for k, v in svc["environment"].items()}
        unknown = {k for k in env if k.startswith("AGORA_")} - known
        assert not unknown, f"{name} passes settings that do not exist: {unknown}"
        Settings.from_env(env)  # raises ConfigError naming a value that does not parse


def test_the_load_balancer_proxies_websockets_to_every_gateway(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    lb = next(s for s in svcs.values() if str(s.get("image", "")).startswith("nginx"))
    mount = next(v for v in lb["volumes"] if "nginx.conf" in v)
    conf = (ROOT / mount.split(":")[0]).read_text()
    assert "proxy_set_header Upgrade $http_upgrade" in conf
    assert "proxy_http_version 1.1" in conf
    gateways = [n for n, s in agora_services(compose).items() if s["command"][1] == "gateway"]
    for name in gateways:
        port = svcs[name]["command"][svcs[name]["command"].index("--port") + 1]
        assert f"server {name}:{port}" in conf, name


def _health_url(svc: dict[str, Any]) -> str:
    test = svc["healthcheck"]["test"]
    found = re.search(r"http://127\.0\.0\.1(?::(\d+))?/[a-z]+", " ".join(test))
    assert found, test
    return found.group(0)


def test_every_long_running_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, svc in services(compose).items():
        check = svc.get("healthcheck")
        if svc.get("restart") == "no":
            # One-shot (migrate): the image's HEALTHCHECK would only mark it unhealthy.
            assert check == {"disable": True}, name
            continue
        assert check and check.get("test"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert "retries" in check and "interval" in check, name


def test_agora_healthchecks_probe_the_port_each_role_serves(compose: dict[str, Any]) -> None:
    roles = set()
    for name, svc in agora_services(compose).items():
        role = svc["command"][1]
        if role == "migrate":
            continue
        url = _health_url(svc)
        if role == "gateway":
            port = svc["command"][svc["command"].index("--port") + 1]
            assert url in (f"http://127.0.0.1:{port}/healthz", f"http://127.0.0.1:{port}/readyz")
        else:
            env = {k: _interpolate(str(v)) for k, v in svc["environment"].items()}
            settings = Settings.from_env(env)
            assert settings.metrics_port, f"{name}: a worker's only port is its metrics port"
            assert url == f"http://127.0.0.1:{settings.metrics_port}/healthz", name
        roles.add(role)
    assert roles == {"gateway", "fanout", "scores"}


def test_the_image_checks_the_gateway_it_runs_by_default() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "HEALTHCHECK" in dockerfile
    cmd = re.search(r"^CMD \[(.*)\]$", dockerfile, re.M)
    assert cmd and '"gateway"' in cmd.group(1)
    port = re.search(r'"--port", "(\d+)"', cmd.group(1))
    assert port and f"http://127.0.0.1:{port.group(1)}/healthz" in dockerfile
    # The image installs exactly the lock file's pins, then the project without resolving.
    assert "pip install -r requirements.lock" in dockerfile
    assert "pip install --no-deps ." in dockerfile
