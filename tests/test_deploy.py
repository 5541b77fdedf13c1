"""Deployment artefacts: the Dockerfile (parsed statically: no Docker engine runs here),
its build context, and the kustomize manifests under k8s/ (rendered with kubectl, validated
against the Kubernetes 1.30 schemas, checked for what keeps a rollout safe), plus the
ConfigMap's config.yaml, which must pass `gateway check` and actually serve and drain."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from gateway.cli import _parser as cli_parser
from gateway.config import ConfigError, GatewayConfig, parse_config
from gateway.routing import RouteTable
from tests.conftest import free_port
from tests.fakes.app import FakeApp

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
K8S_VERSION = "1.30"
GATEWAY_LABELS = {
    "app.kubernetes.io/name": "eventlive-edge",
    "app.kubernetes.io/component": "gateway",
}
PYTHON_BASE = re.compile(r"^python:3\.11\.\d+-slim-[a-z]+$")

# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    cmd: str
    args: str
    flags: dict[str, str] = field(default_factory=dict)

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form of CMD/ENTRYPOINT/RUN, or None for the shell form."""
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def last(self, cmd: str) -> Instruction | None:
        found = self.all(cmd)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> list[Stage]:
    """Enough of the Dockerfile grammar for these checks: comments, `\\` continuations,
    `--flag=value` options, stages."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    stages: list[Stage] = []
    for line in logical:
        cmd, _, rest = line.partition(" ")
        cmd = cmd.upper()
        flags: dict[str, str] = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            key, _, value = flag[2:].partition("=")
            flags[key] = value
            rest = rest.strip()
        if cmd == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
            continue
        assert stages, f"{cmd} before the first FROM"
        stages[-1].instructions.append(Instruction(cmd, rest, flags))
    return stages


@pytest.fixture(scope="module")
def dockerfile() -> list[Stage]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))


def test_dockerfile_is_multi_stage_on_one_pinned_slim_base(dockerfile: list[Stage]) -> None:
    assert len(dockerfile) >= 2
    names = [s.name for s in dockerfile]
    external = [s.base for s in dockerfile if s.base not in names]
    assert external, "no external base image"
    for base in external:
        assert PYTHON_BASE.match(base), f"{base}: pin a python:3.11.X-slim-<debian> tag"
        assert "latest" not in base
    # Builder and runtime on the same interpreter: the copied venv's symlinks and ABI match.
    assert len(set(external)) == 1
    assert dockerfile[0].name == "builder"


def test_dockerfile_builds_the_wheel_into_a_venv_and_runtime_copies_only_the_venv(
    dockerfile: list[Stage],
) -> None:
    builder, runtime = dockerfile[0], dockerfile[-1]
    build_steps = " ".join(i.args for i in builder.all("RUN"))
    assert "python -m venv /opt/venv" in build_steps
    assert _wheel_command(dockerfile), "the builder builds a wheel with pip wheel"
    assert re.search(r"/opt/venv/bin/python -m pip install /dist/\S*\.whl", build_steps)

    copies = runtime.all("COPY")
    from_builder = [c for c in copies if c.flags.get("from") == "builder"]
    assert [c.args for c in from_builder] == ["/opt/venv /opt/venv"]
    # Nothing else of the source tree: only the default config file.
    others = [c.args.split()[0] for c in copies if "from" not in c.flags]
    assert others == ["k8s/base/config.yaml"]
    # No compilers or build tools installed into the final image.
    runtime_steps = " ".join(i.args for i in runtime.all("RUN"))
    for tool in ("apt-get install", "apk add", "gcc", "build-essential", "pip install", "wheel"):
        assert tool not in runtime_steps, tool
    env = " ".join(i.args for i in runtime.all("ENV"))
    assert "PATH=/opt/venv/bin:$PATH" in env
    assert "PYTHONUNBUFFERED=1" in env


def test_dockerfile_has_no_remote_add(dockerfile: list[Stage]) -> None:
    for stage in dockerfile:
        for ins in stage.all("ADD"):
            src = ins.args.split()[0]
            assert not re.match(r"^(https?|git)[:@]", src), f"ADD of a URL: {src}"
            assert not src.endswith(".git"), f"ADD of a git repo: {src}"


def test_dockerfile_runtime_runs_as_numeric_non_root_user(dockerfile: list[Stage]) -> None:
    runtime = dockerfile[-1]
    user = runtime.last("USER")
    assert user is not None, "the final stage sets USER"
    # USER is the final stage's last identity switch: nothing after it runs as root.
    assert runtime.instructions.index(user) > max(
        runtime.instructions.index(i) for i in runtime.all("RUN")
    )
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) > 0, "numeric uid so runAsNonRoot can verify it"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    created = " ".join(i.args for i in runtime.all("RUN"))
    assert f"--uid {uid}" in created, "the uid exists in the image's passwd"


def test_dockerfile_ports_signal_and_command(
    dockerfile: list[Stage], prod_config: GatewayConfig
) -> None:
    runtime = dockerfile[-1]
    exposed = {p.split("/")[0] for i in runtime.all("EXPOSE") for p in i.args.split()}
    assert (
        exposed
        == {
            str(prod_config.server.listen_addr[1]),
            str(prod_config.server.admin_addr[1]),
        }
        == {"8080", "9091"}
    )
    stop = runtime.last("STOPSIGNAL")
    assert stop is not None and stop.args == "SIGTERM"

    entry, cmd = runtime.last("ENTRYPOINT"), runtime.last("CMD")
    assert entry is not None and cmd is not None
    entry_argv, cmd_argv = entry.exec_form(), cmd.exec_form()
    # Exec form: python is PID 1 and receives SIGTERM itself (no /bin/sh in between).
    assert entry_argv is not None and cmd_argv is not None
    argv = entry_argv + cmd_argv
    assert argv == ["python", "-m", "gateway", "serve", "--config", "/etc/gateway/config.yaml"]
    args = cli_parser().parse_args(argv[3:])
    assert (args.command, args.config) == ("serve", "/etc/gateway/config.yaml")

    health = runtime.last("HEALTHCHECK")
    assert health is not None and "127.0.0.1:9091/healthz" in health.args


# --------------------------------------------------------------------------- build context


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    out: list[tuple[bool, re.Pattern[str]]] = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line.lstrip("!").strip("/")
        # Go filepath.Match semantics plus `**`: `*` and `?` stop at `/`.
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif pat.startswith("**", i):
                rx += ".*"
                i += 2
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(pat[i])
                i += 1
        out.append((negate, re.compile(rx + r"\Z")))
    return out


def in_build_context(rel: str) -> bool:
    """Whether a repository path reaches the Docker build context: the last matching
    .dockerignore pattern decides, a pattern matching a parent directory matches its files."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negate, rx in _dockerignore_patterns():
        if any(rx.match(c) for c in candidates):
            included = negate
    return included


def _repo_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


def test_dockerignore_sends_only_what_the_dockerfile_copies(dockerfile: list[Stage]) -> None:
    sources = [
        src
        for stage in dockerfile
        for ins in stage.all("COPY")
        if "from" not in ins.flags
        for src in ins.args.split()[:-1]
    ]
    files = _repo_files()
    for src in sources:
        under = [f for f in files if f == src or f.startswith(src + "/")]
        assert under, f"COPY {src}: nothing in the repository"
        for f in under:
            if "__pycache__" not in f:
                assert in_build_context(f), f"{f} is copied but .dockerignore excludes it"
    # Docker's matching, not Python's fnmatch: `*` stops at `/`, a parent match counts.
    assert in_build_context("gateway/policies/ratelimit/lua/gcra.lua")
    for private in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_deploy.py",
        "bench/x.py",
        "k8s/secret.example.yaml",
        "gateway/__pycache__/x.pyc",
        ".env",
    ):
        assert not in_build_context(private), private


def _wheel_command(stages: list[Stage]) -> list[str]:
    for ins in stages[0].all("RUN"):
        for step in ins.args.split("&&"):
            argv = shlex.split(step)
            if argv[:4] == ["python", "-m", "pip", "wheel"]:
                return argv
    return []


def test_build_context_builds_a_wheel_with_the_lua_scripts(
    dockerfile: list[Stage], tmp_path: Path
) -> None:
    """Run the Dockerfile's own wheel step on exactly the files the build context holds.
    (--no-build-isolation: the test uses the venv's setuptools instead of fetching one.)"""
    ctx = tmp_path / "ctx"
    for f in _repo_files():
        if in_build_context(f):
            (ctx / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, ctx / f)
    argv = _wheel_command(dockerfile)
    assert argv[argv.index("--wheel-dir") + 1] == "/dist"
    dist = tmp_path / "dist"
    argv[argv.index("--wheel-dir") + 1] = str(dist)
    run = subprocess.run(
        [sys.executable, *argv[1:4], "--no-build-isolation", "--no-index", *argv[4:]],
        cwd=ctx,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = dist.glob("eventlive_edge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    lua = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "gateway").rglob("*.lua"))
    assert lua and set(lua) <= names, "the Redis scripts ship in the wheel"
    assert "gateway/py.typed" in names
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "gateway").rglob("*.py")}
    assert modules <= names


# --------------------------------------------------------------------------- manifests


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return kustomize(K8S)


@pytest.fixture(scope="module")
def dev() -> list[dict[str, Any]]:
    return kustomize(K8S / "overlays" / "dev-redis")


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def gateway_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    dep = one(docs, "Deployment", "eventlive-edge")
    containers: list[dict[str, Any]] = dep["spec"]["template"]["spec"]["containers"]
    (c,) = [c for c in containers if c["name"] == "gateway"]
    return c


def container_port(c: dict[str, Any], name_or_number: str | int) -> int:
    for p in c["ports"]:
        if name_or_number in (p["name"], p["containerPort"]):
            return int(p["containerPort"])
    raise AssertionError(f"container has no port {name_or_number!r}")


def test_base_renders_every_kind_the_issue_asks_for(base: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in base)
    assert kinds == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "Ingress",
            "PrometheusRule",
        ]
    )
    # A Secret is never rendered: applying placeholder values would overwrite the real one.
    assert all(d["kind"] != "Secret" for d in base)


@pytest.mark.parametrize("overlay", ["base", "dev"])
def test_every_manifest_validates_against_kubernetes_1_30(
    overlay: str, request: pytest.FixtureRequest
) -> None:
    docs: list[dict[str, Any]] = request.getfixturevalue(overlay)
    assert docs
    for doc in docs:
        if doc["kind"] == "PrometheusRule":
            # A CRD, unknown to the Kubernetes schemas: its shape is checked in
            # tests/test_alerts_artifacts.py.
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        # strict: unknown fields (typos such as `readinessProbes`) are errors too.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_validation_catches_a_broken_manifest(base: list[dict[str, Any]]) -> None:
    dep = copy.deepcopy(one(base, "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    dep = copy.deepcopy(one(base, "Deployment"))
    dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45s"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_secret_example_has_keys_but_no_values() -> None:
    text = (K8S / "secret.example.yaml").read_text(encoding="utf-8")
    secret = yaml.safe_load(text)
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
    assert secret["metadata"]["name"] == "eventlive-edge-secrets"
    assert not secret.get("data") and not secret.get("stringData")
    # Every key the Deployment reads from the Secret is documented in the example.
    refs = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for e in gateway_container(kustomize(K8S)).get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {
        "SUPABASE_JWT_SECRET",
        "SUPABASE_SERVICE_ROLE_KEY",
        "REDIS_URL",
        "ALERT_SLACK_WEBHOOK_URL",
        "ALERT_DISCORD_WEBHOOK_URL",
    }
    for key in refs:
        assert f"# {key}:" in text


def test_probes_use_the_admin_port_paths(
    base: list[dict[str, Any]], prod_config: GatewayConfig
) -> None:
    c = gateway_container(base)
    admin = prod_config.server.admin_addr[1]
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert container_port(c, probe["port"]) == admin
    assert container_port(c, "http") == prod_config.server.listen_addr[1]
    # Readiness reacts faster than liveness: a draining pod is pulled, not restarted.
    ready, live = c["readinessProbe"], c["livenessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] < (
        live["periodSeconds"] * live["failureThreshold"]
    )


def test_pod_and_container_security_context(base: list[dict[str, Any]]) -> None:
    pod = one(base, "Deployment")["spec"]["template"]["spec"]
    c = gateway_container(base)
    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and csc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 10001, "the image's USER"
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in csc["capabilities"]
    assert pod["automountServiceAccountToken"] is False
    # Read-only root: the only writable path is an in-memory /tmp.
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert set(mounts) == {"/etc/gateway", "/tmp"}
    assert mounts["/etc/gateway"]["readOnly"] is True
    assert "subPath" not in mounts["/etc/gateway"], "subPath mounts never see ConfigMap updates"


def test_dockerfile_user_matches_the_pod_uid(
    dockerfile: list[Stage], base: list[dict[str, Any]]
) -> None:
    user = dockerfile[-1].last("USER")
    assert user is not None
    psc = one(base, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert user.args == f"{psc['runAsUser']}:{psc['runAsGroup']}"


def _prestop_seconds(c: dict[str, Any]) -> float:
    pre = c["lifecycle"]["preStop"]
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    argv = pre["exec"]["command"]
    assert argv[0] in ("sleep", "/bin/sleep"), argv
    return float(argv[1])


def test_termination_grace_covers_prestop_and_drain(
    base: list[dict[str, Any]], prod_config: GatewayConfig
) -> None:
    pod = one(base, "Deployment")["spec"]["template"]["spec"]
    pre = _prestop_seconds(gateway_container(base))
    # Long enough for ingress-nginx to drop the endpoint before the gateway stops accepting.
    assert pre >= 5
    drain = prod_config.server.drain_timeout
    assert pod["terminationGracePeriodSeconds"] > pre + drain


def test_topology_spread_and_resources(base: list[dict[str, Any]]) -> None:
    pod = one(base, "Deployment")["spec"]["template"]["spec"]
    spread = {t["topologyKey"]: t for t in pod["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for t in spread.values():
        assert t["maxSkew"] == 1
        assert t["labelSelector"]["matchLabels"] == GATEWAY_LABELS
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    res = gateway_container(base)["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[kind]), kind
    assert _mem(res["requests"]["memory"]) <= _mem(res["limits"]["memory"])


def _mem(q: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(q[:-2]) * units[q[-2:]] if q[-2:] in units else int(q)


def test_replicas_owned_by_hpa_pdb_and_selectors_line_up(base: list[dict[str, Any]]) -> None:
    dep = one(base, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"] == GATEWAY_LABELS
    assert GATEWAY_LABELS.items() <= pod_labels.items()
    # The HPA owns the count; a fixed replicas: would undo a scale-out on every apply.
    assert "replicas" not in dep["spec"]
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = one(base, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "eventlive-edge",
    }
    assert hpa["spec"]["minReplicas"] == 3 < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    pdb = one(base, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == GATEWAY_LABELS
    assert pdb["spec"]["maxUnavailable"] == 1 < hpa["spec"]["minReplicas"]
    svc = one(base, "Service", "eventlive-edge")
    assert svc["spec"]["selector"] == GATEWAY_LABELS


def test_service_ingress_and_networkpolicy_ports(
    base: list[dict[str, Any]], prod_config: GatewayConfig
) -> None:
    c = gateway_container(base)
    svc = one(base, "Service", "eventlive-edge")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert container_port(c, ports["http"]["targetPort"]) == 8080
    assert container_port(c, ports["admin"]["targetPort"]) == 9091

    ing = one(base, "Ingress")
    ann = ing["metadata"]["annotations"]
    # WebSocket (Supabase Realtime) connections outlive nginx's 60s default.
    assert int(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(ann["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    assert ing["spec"]["ingressClassName"] == "nginx"
    # nginx and the gateway agree on the body limit, so a 413 always comes from one place.
    size = ann["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert size.endswith("m") and int(size[:-1]) << 20 == prod_config.server.max_body_bytes
    # The gateway outlasts ingress-nginx's upstream-keepalive-timeout (60s): it never
    # closes an idle connection nginx is about to reuse (that race is a 502).
    assert prod_config.server.keep_alive_timeout > 60
    backends = [p["backend"]["service"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
    assert backends == [{"name": "eventlive-edge", "port": {"name": "http"}}], (
        "the ingress reaches the public port only, never admin"
    )

    pol = one(base, "NetworkPolicy", "eventlive-edge")
    assert pol["spec"]["podSelector"]["matchLabels"] == GATEWAY_LABELS
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    by_port: dict[int, list[dict[str, Any]]] = {}
    for rule in pol["spec"]["ingress"]:
        for p in rule["ports"]:
            by_port.setdefault(container_port(c, p["port"]), []).extend(rule["from"])
    assert set(by_port) == {8080, 9091}
    # Admin: only Prometheus pods in the monitoring namespace (namespace AND pod selector).
    (admin_peer,) = by_port[9091]
    assert admin_peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert "podSelector" in admin_peer
    # Public: the ingress controller's pods (and the app's own server side), nobody else.
    controller = [p for p in by_port[8080] if "namespaceSelector" in p]
    assert [p["namespaceSelector"]["matchLabels"] for p in controller] == [
        {"kubernetes.io/metadata.name": "ingress-nginx"}
    ]
    assert controller[0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "ingress-nginx"
    }
    assert all(p.get("podSelector", {}).get("matchLabels") for p in by_port[8080])


def test_image_is_pinned(base: list[dict[str, Any]]) -> None:
    image = gateway_container(base)["image"]
    name, _, tag = image.rpartition(":")
    assert name and "/" in name, image
    assert tag and tag != "latest", image


def test_dev_overlay_runs_one_gateway_on_an_in_namespace_redis(
    dev: list[dict[str, Any]], prod_config: GatewayConfig
) -> None:
    gw = one(dev, "Deployment", "eventlive-edge")
    assert gw["spec"]["replicas"] == 1
    assert all(d["kind"] != "HorizontalPodAutoscaler" for d in dev)
    redis = one(dev, "Deployment", "redis")
    (rc,) = redis["spec"]["template"]["spec"]["containers"]
    assert re.match(r"^redis:\d+\.\d+\.\d+", rc["image"]), "pinned redis tag"
    assert rc["securityContext"]["readOnlyRootFilesystem"] is True
    svc = one(dev, "Service", "redis")
    # The config's fallback store URL (no REDIS_URL in the Secret) names this Service.
    assert prod_config.store.url == "redis://redis:6379/0"
    assert svc["metadata"]["name"] == "redis"
    assert [p["port"] for p in svc["spec"]["ports"]] == [6379]
    assert (
        svc["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    )
    pol = one(dev, "NetworkPolicy", "redis")
    (rule,) = pol["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": GATEWAY_LABELS}}]


# --------------------------------------------------------------------------- the ConfigMap's config

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def configmap_config(docs: list[dict[str, Any]]) -> str:
    cm = one(docs, "ConfigMap", "eventlive-edge-config")
    text: str = cm["data"]["config.yaml"]
    return text


def pod_env(docs: list[dict[str, Any]], secrets: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the gateway container gets: literal env, envFrom ConfigMaps, and
    the given Secret keys (absent keys are skipped — every secretKeyRef is optional)."""
    c = gateway_container(docs)
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        ref = src["configMapRef"]["name"]
        env.update(one(docs, "ConfigMap", ref)["data"])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["optional"] is True, e["name"]
        if secrets and ref["key"] in secrets:
            env[e["name"]] = secrets[ref["key"]]
    return env


@pytest.fixture(scope="module")
def prod_config(base: list[dict[str, Any]]) -> GatewayConfig:
    return parse_config(configmap_config(base), env=pod_env(base))


def test_configmap_is_the_file_the_image_ships(base: list[dict[str, Any]]) -> None:
    assert configmap_config(base) == (K8S / "base/config.yaml").read_text(encoding="utf-8")
    dep = one(base, "Deployment")
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in gateway_container(base)["volumeMounts"] if m["name"] == "config"]
    assert vols["config"]["configMap"]["name"] == "eventlive-edge-config"
    assert mount["mountPath"] + "/config.yaml" == "/etc/gateway/config.yaml"


def test_an_empty_redis_url_is_refused_not_replaced(base: list[dict[str, Any]]) -> None:
    """docs/deploy.md: a Secret with REDIS_URL set to "" must not fall back silently to an
    in-namespace Redis that production does not run."""
    with pytest.raises(ConfigError) as exc:
        parse_config(configmap_config(base), env=pod_env(base, {"REDIS_URL": ""}))
    assert [str(i) for i in exc.value.issues] == [
        "store.url: is empty; set memory:// or a redis:// URL"
    ]
    url = "rediss://:pw@redis.internal:6380/0"
    cfg = parse_config(configmap_config(base), env=pod_env(base, {"REDIS_URL": url}))
    assert cfg.store.url == url


def test_configmap_config_is_a_production_redis_config(prod_config: GatewayConfig) -> None:
    s = prod_config.server
    assert s.listen == "0.0.0.0:8080" and s.admin_listen == "0.0.0.0:9091"
    assert s.trusted_proxies == ["10.0.0.0/8"]
    assert prod_config.store.url == "redis://redis:6379/0"
    assert prod_config.store.on_failure == "local"
    assert prod_config.upstreams["app"].url == "http://eventlive-app:3000"
    assert prod_config.upstreams["supabase"].url == "https://your-project-ref.supabase.co"
    assert prod_config.auth.hs256_secret == "", "no secret without the Secret"
    assert prod_config.auth.jwks_url == (
        "https://your-project-ref.supabase.co/auth/v1/.well-known/jwks.json"
    )
    # The shipped single-process config.yaml's routes, in order and unchanged; the only
    # additions are pass-through routes for the rest of the Supabase API.
    shipped = parse_config((ROOT / "config.yaml").read_text(encoding="utf-8"), env={})
    shipped_names = [r.name for r in shipped.routes]
    prod = {r.name: r for r in prod_config.routes}
    assert [n for n in prod if n in shipped_names] == shipped_names
    for r in shipped.routes:
        assert prod[r.name].model_dump() == r.model_dump(), r.name
    for name in set(prod) - set(shipped_names):
        extra = prod[name]
        assert extra.upstream == "supabase" and extra.auth.mode == "off", name
        assert not (extra.heartbeat or extra.cache or extra.refresh or extra.rate_limit), name


@pytest.mark.parametrize(
    ("method", "path", "query", "route", "upstream"),
    [
        # What supabase-js sends once NEXT_PUBLIC_SUPABASE_URL is the gateway's host.
        ("POST", "/auth/v1/token", "grant_type=refresh_token", "token_refresh", "supabase"),
        ("POST", "/auth/v1/token", "grant_type=password", "supabase_auth", "supabase"),
        ("GET", "/auth/v1/user", "", "supabase_auth", "supabase"),
        ("GET", "/rest/v1/webinars", "select=*", "supabase_rest", "supabase"),
        ("GET", "/realtime/v1/websocket", "apikey=k&vsn=1.0.0", "supabase_realtime", "supabase"),
        ("PUT", "/storage/v1/object/avatars/a.png", "", "supabase_storage", "supabase"),
        ("POST", "/functions/v1/notify", "", "supabase_functions", "supabase"),
        ("POST", "/graphql/v1", "", "supabase_graphql", "supabase"),
        # ... and the Next.js app on the same host.
        ("POST", "/api/webinars/7/presence/ping", "", "presence_ping", "app"),
        ("GET", "/webinars/7", "", "default", "app"),
        ("GET", "/_next/static/chunks/main.js", "", "default", "app"),
    ],
)
def test_one_host_serves_supabase_js_and_the_app(
    prod_config: GatewayConfig, method: str, path: str, query: str, route: str, upstream: str
) -> None:
    table = RouteTable(prod_config.routes)
    scope = {"type": "http", "method": method, "path": path, "query_string": query.encode()}
    matched = table.match(scope)
    assert matched is not None
    assert (matched[0].name, matched[0].config.upstream) == (route, upstream)


def test_configmap_config_reads_the_secret_when_present(base: list[dict[str, Any]]) -> None:
    secrets = {
        "REDIS_URL": "rediss://:pw@redis.internal:6380/0",
        "SUPABASE_JWT_SECRET": "x" * 40,
    }
    cfg = parse_config(configmap_config(base), env=pod_env(base, secrets))
    assert cfg.store.url == "rediss://:pw@redis.internal:6380/0"
    assert cfg.auth.hs256_secret == "x" * 40


def test_every_config_variable_is_wired_into_the_pod(base: list[dict[str, Any]]) -> None:
    text = configmap_config(base)
    live = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    used = {m.group(1): m.group(2) is not None for m in _VAR.finditer(live)}
    c = gateway_container(base)
    declared = {e["name"] for e in c.get("env", [])}
    for src in c.get("envFrom", []):
        declared |= set(one(base, "ConfigMap", src["configMapRef"]["name"])["data"])
    assert set(used) <= declared, f"not provided to the pod: {set(used) - declared}"
    required = {v for v, has_default in used.items() if not has_default}
    assert required <= set(pod_env(base)), "a variable without default must always be set"
    # The alert webhooks read optional Secret keys the Deployment maps; empty means off.
    cfg = parse_config(text, env=pod_env(base))
    assert {"ALERT_SLACK_WEBHOOK_URL", "ALERT_DISCORD_WEBHOOK_URL"} <= declared
    assert cfg.alerts.webhooks == []


def test_gateway_check_accepts_the_configmap_and_rejects_a_broken_one(
    base: list[dict[str, Any]], tmp_path: Path
) -> None:
    text = configmap_config(base)
    env = {**os.environ, **pod_env(base)}
    good = tmp_path / "config.yaml"
    good.write_text(text, encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(good)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "store redis" in run.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("ttl: 10s", "ttl: 0s"), encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(bad)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "routes[2].cache.ttl" in run.stderr


# --------------------------------------------------------------------------- it serves and drains


@pytest.fixture
def served_config(base: list[dict[str, Any]], tmp_path: Path) -> tuple[Path, int, int]:
    """The ConfigMap's config.yaml with only the listeners moved to free loopback ports."""
    public, admin = free_port(), free_port()
    text = configmap_config(base)
    text = text.replace("listen: 0.0.0.0:8080", f"listen: 127.0.0.1:{public}")
    text = text.replace("admin_listen: 0.0.0.0:9091", f"admin_listen: 127.0.0.1:{admin}")
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path, public, admin


async def _ready_then_get(
    client: httpx.AsyncClient, proc: asyncio.subprocess.Process, admin: int, public_path: str
) -> tuple[httpx.Response, httpx.Response]:
    """Poll /readyz (bounded: 20 s, the gateway must not exit meanwhile) until 200, then
    GET `public_path` (port/path) on the public listener: both listeners are bound before
    either server starts, so a ready gateway accepts there too."""
    deadline = time.monotonic() + 20
    while True:
        try:
            r = await client.get(f"http://127.0.0.1:{admin}/readyz")
            if r.status_code == 200:
                return r, await client.get(f"http://127.0.0.1:{public_path}")
        except httpx.TransportError:
            pass
        assert proc.returncode is None, "gateway exited during start"
        assert time.monotonic() < deadline, "not ready within 20s"
        await asyncio.sleep(0.05)


async def test_configmap_config_serves_on_redis_and_drains_on_sigterm(
    base: list[dict[str, Any]],
    served_config: tuple[Path, int, int],
    redis_url: str,
    fake_app: FakeApp,
) -> None:
    path, public, admin = served_config
    env = {
        **os.environ,
        # No issuer answers at SUPABASE_URL: the shared secret is the pod's verification
        # key (without any key /readyz stays 503).
        **pod_env(
            base, {"REDIS_URL": redis_url, "SUPABASE_JWT_SECRET": "k8s-test-secret-32-bytes-long!!"}
        ),
        "APP_URL": fake_app.url,
        "SUPABASE_URL": "http://127.0.0.1:9",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "--config",
        str(path),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            r, page = await _ready_then_get(client, proc, admin, f"{public}/webinars/42")
            assert r.json()["checks"]["store"]["backend"].startswith("redis")
            assert (await client.get(f"http://127.0.0.1:{admin}/healthz")).status_code == 200

            assert page.status_code == 200 and fake_app.hits["/webinars/42"] == 1

            # An in-flight request when SIGTERM arrives still completes; meanwhile
            # readiness reports 503 so the endpoint is pulled; then the process exits 0.
            inflight = asyncio.create_task(client.get(f"http://127.0.0.1:{public}/slow?s=1"))
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            ready = await client.get(f"http://127.0.0.1:{admin}/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["draining"] is True
            done = await inflight
            assert done.status_code == 200 and done.json() == {"slow": True}
        started = time.monotonic()
        code = await asyncio.wait_for(proc.wait(), timeout=25)
        assert code == 0
        assert time.monotonic() - started < 20, "idle drain took the whole drain_timeout"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
