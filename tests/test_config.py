"""Config: parsing, units, interpolation, cross-field checks, and `gateway check`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, parse_config
from gateway.units import parse_duration, parse_rate

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
upstreams:
  app: {url: http://127.0.0.1:3000}
routes:
  - name: default
    match: {path: "/{path:path}"}
    upstream: app
    auth: off
"""


def issues(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, env or {})
    return [str(i) for i in exc.value.issues]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("50ms", 0.05), ("10s", 10), ("5m", 300), ("1.5h", 5400), ("2d", 172800), (0, 0)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["10", 10, "s", "10 parsecs", "-1s", True])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("5/s", 5), ("100/min", 100 / 60), ("10/5m", 10 / 300), ("3/h", 3 / 3600)],
)
def test_rates(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


def test_minimal_config_gets_defaults() -> None:
    cfg = parse_config(MINIMAL, {})
    assert cfg.server.listen == "127.0.0.1:8080"
    assert cfg.store.url == "memory://"
    assert cfg.store.timeout == pytest.approx(0.05)
    assert cfg.routes[0].auth.mode == "off"


def test_shipped_config_is_valid() -> None:
    cfg = parse_config((ROOT / "config.yaml").read_text(), {})
    names = [r.name for r in cfg.routes]
    assert names[:5] == [
        "presence_ping",
        "access_track",
        "admin_stats",
        "token_refresh",
        "chat_poll",
    ]
    assert names[-1] == "default"
    assert cfg.store.is_memory
    assert cfg.routes[4].rate_limit is not None
    assert cfg.routes[4].rate_limit[0].rate == pytest.approx(2.0)


def test_env_interpolation_with_defaults() -> None:
    text = MINIMAL.replace("http://127.0.0.1:3000", "'${APP:-http://127.0.0.1:3000}'") + (
        "auth: {hs256_secret: '${SECRET}', audience: '${AUD:-authenticated}'}\n"
    )
    cfg = parse_config(text, {"SECRET": "s3cr3t: with # yaml chars"})
    assert cfg.auth.hs256_secret == "s3cr3t: with # yaml chars"
    assert cfg.auth.audience == "authenticated"
    assert cfg.upstreams["app"].url == "http://127.0.0.1:3000"
    assert issues(text, {}) == [
        "auth.hs256_secret: environment variable SECRET is not set (no default)"
    ]


def test_errors_name_the_dotted_key() -> None:
    text = """
upstreams:
  app: {url: http://127.0.0.1:3000}
routes:
  - name: a
    match: {path: /a}
    upstream: app
    auth: off
  - name: b
    match: {path: /b}
    upstream: nosuch
    auth: off
  - name: c
    match: {path: /c}
    upstream: app
    auth: off
    cache: {ttl: 10}
  - name: a
    match: {path: /d, methods: [GET]}
    upstream: app
    auth: off
    rate_limit: [{by: user, rate: fast}]
"""
    found = issues(text)
    assert "routes[2].cache.ttl: duration 10 has no unit; write e.g. '10s' or '10ms'" in found
    assert any(f.startswith("routes[3].rate_limit[0].rate: invalid rate 'fast'") for f in found)
    # References are checked in the same pass as the types.
    assert "routes[1].upstream: unknown upstream 'nosuch'" in found
    assert "routes[3].name: duplicate route name 'a' (also routes[0])" in found
    text = text.replace("ttl: 10}", "ttl: 10s}").replace("rate: fast", "rate: 5/s")
    found = issues(text)
    assert "routes[1].upstream: unknown upstream 'nosuch'" in found
    assert "routes[3].name: duplicate route name 'a' (also routes[0])" in found


def test_unknown_keys_are_errors() -> None:
    found = issues(MINIMAL + "server: {listne: 1.2.3.4:80}\n")
    assert found == ["server.listne: unknown key (check the spelling)"]


def test_memory_store_refused_with_workers() -> None:
    found = issues(MINIMAL + "server: {workers: 2}\n")
    assert found[0].startswith("store.url: memory:// is per process")


def test_auth_routes_need_keys() -> None:
    found = issues(MINIMAL.replace("auth: off", "auth: required"))
    assert found[0].startswith("auth: routes verify tokens")


def test_yaml_syntax_error_has_position() -> None:
    found = issues("routes: [\n  a: b\n")
    assert found[0].startswith("YAML syntax error at line")


def test_bad_path_template() -> None:
    found = issues(MINIMAL.replace('"/{path:path}"', '"/{x:nosuch}"'))
    assert found[0].startswith("routes[0].match.path: invalid path template")


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def test_cli_check_ok() -> None:
    r = run_cli("check", "--config", "config.yaml")
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_cli_check_reports_every_error_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        MINIMAL.replace("upstream: app", "upstream: nosuch")
        + "store: {url: 'ftp://x', on_failure: maybe}\n"
    )
    r = run_cli("check", "--config", str(bad))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "store.url: unsupported store scheme 'ftp'" in r.stderr
    assert "store.on_failure: Input should be 'local', 'open' or 'closed'" in r.stderr
    missing = run_cli("check", "--config", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr


def test_cluster_key_prefix_without_braces() -> None:
    found = issues(MINIMAL + "store: {url: 'redis+cluster://127.0.0.1:7000', key_prefix: '{e}:'}\n")
    assert found == ["store.key_prefix: must not contain '{' or '}' with a redis+cluster:// store"]
