"""Safe by default: weak secrets and the dev token endpoint stay out of deployments, and no
access log records a token from a query string."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from core.errors import ConfigError
from core.settings import EXAMPLE_JWT_SECRET, Settings
from gateway.auth import TokenVerifier
from gateway.http import dev

ROOT = Path(__file__).resolve().parents[2]


def settings(secret: str, dev_tokens: bool = False) -> Settings:
    return Settings.from_env(
        {"AGORA_JWT_SECRET": secret, "AGORA_DEV_TOKENS": "true" if dev_tokens else "false"}
    )


@pytest.mark.parametrize("secret", [EXAMPLE_JWT_SECRET, "x" * 31, "short", "é" * 15])
def test_weak_hs_secrets_are_refused_outside_dev_mode(secret: str) -> None:
    with pytest.raises(ConfigError) as err:
        TokenVerifier(settings(secret))
    assert "AGORA_JWT_SECRET" in str(err.value)
    TokenVerifier(settings(secret, dev_tokens=True))  # dev mode (loopback only) takes it


def test_a_strong_secret_is_accepted_and_rs_keys_are_not_held_to_it() -> None:
    TokenVerifier(settings("k" * 32))
    TokenVerifier(settings("é" * 16))  # 32 bytes in UTF-8
    rs_only = Settings.from_env(
        {"AGORA_JWT_ALGORITHMS": "RS256", "AGORA_JWT_PUBLIC_KEY": "pem", "AGORA_JWT_SECRET": ""}
    )
    TokenVerifier(rs_only)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "gateway1"])
def test_dev_mode_refuses_a_non_loopback_bind(host: str) -> None:
    with pytest.raises(ConfigError) as err:
        dev.check_bind(settings("k" * 32, dev_tokens=True), host)
    assert "AGORA_DEV_TOKENS" in str(err.value)
    dev.check_bind(settings("k" * 32), host)  # without dev mode any bind is fine


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_dev_mode_on_loopback_is_fine(host: str) -> None:
    dev.check_bind(settings("k" * 32, dev_tokens=True), host)


def test_no_file_a_deployment_reads_turns_dev_tokens_on() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    common = compose.get("x-agora-env", {})
    values = [str(common.get("AGORA_DEV_TOKENS", "false"))]
    for svc in compose["services"].values():
        env = svc.get("environment") or {}
        if isinstance(env, dict) and "AGORA_DEV_TOKENS" in env:
            values.append(str(env["AGORA_DEV_TOKENS"]))
    assert values and all(v == "false" for v in values), values
    assert "${AGORA_DEV_TOKENS" not in (ROOT / "docker-compose.yml").read_text()
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^AGORA_DEV_TOKENS=false$", example, re.M)
    # The example secret it carries is refused by any gateway outside dev mode (above).
    assert f"AGORA_JWT_SECRET={EXAMPLE_JWT_SECRET}" in example


def test_nginx_logs_paths_never_query_strings() -> None:
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    formats = dict(re.findall(r"log_format\s+(\w+)\s+((?:'[^']*'\s*)+);", conf))
    logs = re.findall(r"access_log\s+([^;]+);", conf)
    assert logs, "no access_log: nginx would use its default format, with the query string"
    for line in logs:
        parts = line.split()
        assert parts[0] == "off" or (len(parts) >= 2 and parts[1] in formats), line
    for name, fmt in formats.items():
        for leaky in ("$request ", '$request"', "$request_uri", "$args", "$query_string", "$arg_"):
            assert leaky not in fmt, (name, leaky)
