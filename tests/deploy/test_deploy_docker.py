"""deploy/docker: lint the Dockerfile, validate compose.yaml, and check that the
image's ports, config, health check and Prometheus target agree with each other.

No Docker engine runs here, so the image itself is never built in these tests.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploytools import DOCKER, REPO, run, tool

DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
IMAGE_CONFIG = DOCKER / "shardudp.toml"
MULTICAST_CONFIG = DOCKER / "shardudp-multicast.toml"
MULTICAST_MARK = "  # shardudp-multicast:"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def compose_doc() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def multicast_variant(tmp_path: Path) -> Path:
    """compose.yaml with its commented multicast service uncommented."""
    lines = COMPOSE.read_text().splitlines()
    start = lines.index(MULTICAST_MARK)
    block = []
    for line in lines[start:]:
        if not line.startswith("  #"):
            break
        block.append(line[:2] + line[4:])
    service = yaml.safe_load("\n".join(block))
    doc = compose_doc()
    doc["services"].update(service)
    path = tmp_path / "compose-multicast.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# -- hadolint


def test_hadolint_passes_at_warning_threshold() -> None:
    res = run([tool("hadolint"), "--failure-threshold", "warning", str(DOCKERFILE)])
    assert res.returncode == 0, res.stdout


def test_hadolint_would_catch_an_unpinned_install(tmp_path: Path) -> None:
    """The linter really runs with rules on: an obviously sloppy file fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    res = run([tool("hadolint"), "--failure-threshold", "warning", str(bad)])
    assert res.returncode != 0
    assert "DL3008" in res.stdout  # unpinned apt package


# -- compose


def test_compose_matches_the_compose_spec_schema(tmp_path: Path) -> None:
    cmd = [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    res = run([*cmd, str(COMPOSE), str(multicast_variant(tmp_path))])
    assert res.returncode == 0, res.stdout


def test_compose_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    doc = compose_doc()
    doc["services"]["shardudp"]["ports"] = {"udp": 9999}  # must be a list
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    res = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad)])
    assert res.returncode != 0
    assert "ports" in res.stdout


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="Debian's docker-compose is not installed (optional second validator)")
@pytest.mark.parametrize("variant", ["plain", "multicast"])
def test_docker_compose_config_accepts_the_file(variant: str, tmp_path: Path) -> None:
    path = COMPOSE if variant == "plain" else multicast_variant(tmp_path)
    # --project-directory keeps relative paths (build context, volumes) anchored in deploy/docker.
    res = run(["docker-compose", "--project-directory", str(DOCKER), "-f", str(path),
               "config", "-q"], env={**os.environ, "DOCKER_HOST": "unix:///nonexistent"})
    assert res.returncode == 0, res.stdout


def test_multicast_variant_uses_the_host_network(tmp_path: Path) -> None:
    doc = yaml.safe_load(multicast_variant(tmp_path).read_text())
    svc = doc["services"]["shardudp-multicast"]
    assert svc["network_mode"] == "host"
    assert "ports" not in svc  # meaningless with the host's network
    mounted = {v.split(":")[0] for v in svc["volumes"]}
    assert "./shardudp-multicast.toml" in mounted
    assert MULTICAST_CONFIG.is_file()


# -- the pieces agree


def image_config() -> dict[str, Any]:
    return tomllib.loads(IMAGE_CONFIG.read_text())


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_exposed_ports_are_the_configs() -> None:
    cfg = image_config()
    exposed = {arg for word, rest in dockerfile_instructions() if word == "EXPOSE"
               for arg in rest.split()}
    want = {f"{port_of(lst['bind'])}/udp" for lst in cfg["listener"]}
    want.add(f"{port_of(cfg['metrics'])}/tcp")
    assert exposed == want


def test_compose_publishes_the_exposed_ports() -> None:
    cfg = image_config()
    ports = compose_doc()["services"]["shardudp"]["ports"]
    published = set()
    for spec in ports:
        target, _, proto = str(spec).rpartition(":")[2].partition("/")
        published.add((int(target), proto or "tcp"))
    want = {(port_of(lst["bind"]), "udp") for lst in cfg["listener"]}
    want.add((port_of(cfg["metrics"]), "tcp"))
    assert published == want


def test_image_runs_as_a_numeric_non_root_user_under_tini() -> None:
    instr = dockerfile_instructions()
    users = [rest for word, rest in instr if word == "USER"]
    assert users, "no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0
    assert not gid or gid.isdigit()
    entry = [rest for word, rest in instr if word == "ENTRYPOINT"][-1]
    assert re.match(r'\["/usr/bin/tini", "--", "shardudp"', entry), entry


def test_healthcheck_probes_the_configured_metrics_port() -> None:
    cfg = image_config()
    health = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"][-1]
    m = re.search(r'"shardudp", "health", "--metrics", "([^"]+)"', health)
    assert m, health
    assert port_of(m.group(1)) == port_of(cfg["metrics"])
    # Inside the container the probe reaches the server on loopback.
    assert m.group(1).startswith("127.0.0.1:")


def test_prometheus_scrapes_the_compose_service() -> None:
    cfg = image_config()
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    assert targets == [f"shardudp:{port_of(cfg['metrics'])}"]
    mounts = compose_doc()["services"]["prometheus"]["volumes"]
    assert any(m.startswith("./prometheus.yml:") for m in mounts)


@pytest.mark.parametrize("config", [IMAGE_CONFIG, MULTICAST_CONFIG], ids=lambda p: p.name)
def test_bundled_configs_pass_shardudp_check(config: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env = {k: v for k, v in env.items() if not k.startswith("SHARDUDP_")}
    res = run([sys.executable, "-m", "shardudp", "check", "--config", str(config)], env=env,
              cwd=REPO)
    assert res.returncode == 0, res.stdout
