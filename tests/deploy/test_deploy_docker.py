"""deploy/docker: lint the Dockerfile, validate compose.yaml, check that the
image's ports, config, health check and Prometheus target agree with each other,
and run the image's command in an emulated container (container.py) for the
image alone and for each compose service, the commented multicast one included.

No Docker engine runs here, so the image itself is never built in these tests.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any

import container
import pytest
import yaml
from deploytools import ANSIBLE, DOCKER, REPO, ROLE, run, tool
from harness import free_port, free_tcp_port, session_pids

from shardudp.cli import usable_cpus

DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
IMAGE_CONFIG = DOCKER / "shardudp.toml"
MULTICAST_CONFIG = DOCKER / "shardudp-multicast.toml"
MULTICAST_BEGIN = "  # BEGIN shardudp-multicast"
MULTICAST_END = "  # END shardudp-multicast"
#: node_exporter's port, taken on most hosts Prometheus monitors.
NODE_EXPORTER_PORT = 9100


def dockerfile_instructions() -> list[tuple[str, str]]:
    return container.instructions(DOCKERFILE)


def compose_doc() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def multicast_service() -> dict[str, Any]:
    """The commented multicast service: the lines between its markers, uncommented."""
    lines = COMPOSE.read_text().splitlines()
    block = lines[lines.index(MULTICAST_BEGIN) + 1:lines.index(MULTICAST_END)]
    assert all(line.startswith("  #") for line in block), block
    service = yaml.safe_load("\n".join(line[:2] + line[4:] for line in block))
    assert isinstance(service, dict) and list(service) == ["shardudp-multicast"], service
    return service


def all_services() -> dict[str, dict[str, Any]]:
    services = dict(compose_doc()["services"])
    services.update(multicast_service())
    return services


def multicast_variant(tmp_path: Path) -> Path:
    """compose.yaml with its commented multicast service uncommented."""
    doc = compose_doc()
    doc["services"].update(multicast_service())
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


def test_multicast_variant_uses_the_host_network() -> None:
    svc = multicast_service()["shardudp-multicast"]
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


def service_config(name: str) -> dict[str, Any]:
    """The config a compose service runs with: a mounted one, else the image's."""
    for spec in all_services()[name].get("volumes", []):
        src, dst = spec.split(":")[:2]
        if dst == "/etc/shardudp/shardudp.toml":
            return tomllib.loads((DOCKER / src).read_text())
    return image_config()


def health_probe(name: str) -> str:
    """The HOST:PORT a service's health check probes: its own, else the image's."""
    test = all_services()[name].get("healthcheck", {}).get("test")
    argv = test[1:] if test else container.parse_image(DOCKERFILE).healthcheck
    assert argv[:3] == ["shardudp", "health", "--metrics"], argv
    return str(argv[3])


@pytest.mark.parametrize("name", ["shardudp", "shardudp-multicast"])
def test_healthcheck_probes_the_configured_metrics_port(name: str) -> None:
    probe = health_probe(name)
    assert port_of(probe) == port_of(service_config(name)["metrics"])
    # Inside the container the probe reaches the server on loopback.
    assert probe.startswith("127.0.0.1:")


def ansible_metrics_ports() -> dict[str, int]:
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    spec = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    ports = {
        "role defaults": port_of(defaults["shardudp_metrics"]),
        "argument_specs": port_of(
            spec["argument_specs"]["main"]["options"]["shardudp_metrics"]["default"]),
    }
    for path in sorted((ANSIBLE / "inventory" / "group_vars").glob("*.yml")):
        ports[path.name] = port_of(yaml.safe_load(path.read_text())["shardudp_metrics"])
    return ports


def test_one_metrics_port_everywhere_and_not_node_exporters() -> None:
    image = container.parse_image(DOCKERFILE)
    exposed_tcp = [int(a.split("/")[0]) for w, rest in dockerfile_instructions() if w == "EXPOSE"
                   for a in rest.split() if a.endswith("/tcp")]
    ports = {"image config": port_of(image_config()["metrics"]),
             "EXPOSE": exposed_tcp[0], "HEALTHCHECK": port_of(image.healthcheck[3]),
             **ansible_metrics_ports()}
    assert len(exposed_tcp) == 1
    assert NODE_EXPORTER_PORT not in ports.values(), ports
    assert len(set(ports.values())) == 1, ports
    # The host-network variant cannot share the port the bridged service
    # publishes on the host's loopback.
    variant = port_of(service_config("shardudp-multicast")["metrics"])
    assert variant not in (NODE_EXPORTER_PORT, ports["EXPOSE"])


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


# -- the image run as Docker would run it (container.py)


def namespaces_missing() -> str | None:
    """Why the emulated container cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (mount and PID namespaces)"
    for cmd in ("unshare", "nsenter", "setpriv", "mount"):
        if shutil.which(cmd) is None:
            return f"{cmd} not installed (util-linux)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "no overlay file system"
    entrypoint = container.parse_image(DOCKERFILE).entrypoint[0]
    if not os.access(entrypoint, os.X_OK):
        return f"the image's entrypoint {entrypoint} is not on this machine (apt-get install tini)"
    return None


ADDRESS = re.compile(r'"(\[[^\]]*\]|[^":]*):(\d+)"')


def relocation(config: dict[str, Any]) -> dict[int, int]:
    """Free loopback ports for every port ``config`` binds, so tests never clash."""
    ports = {port_of(config["metrics"]): free_tcp_port()}
    for lst in config["listener"]:
        ports[port_of(lst.get("bind") or lst["multicast"])] = free_port(socket.AF_INET)
    return ports


def relocate(text: str, ports: dict[int, int]) -> str:
    """``text`` (TOML) with each bound port moved and each wildcard host made loopback."""
    def sub(m: re.Match[str]) -> str:
        host, port = m.group(1), int(m.group(2))
        if port not in ports:
            return m.group(0)
        return f'"{"127.0.0.1" if host in ("", "0.0.0.0", "[::]") else host}:{ports[port]}"'
    return ADDRESS.sub(sub, text)


def assert_every_bind_echoes(config: dict[str, Any], ports: dict[int, int]) -> None:
    """Each unicast listener of ``config``, at its relocated port, echoes a ping."""
    for lst in config["listener"]:
        if "bind" in lst:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                addr = ("127.0.0.1", ports[port_of(lst["bind"])])
                s.sendto(b"ping", addr)
                assert select.select([s], [], [], 10.0)[0], f"no echo from {addr}"
                assert s.recvfrom(64) == (b"ping", addr)


@pytest.mark.skipif(namespaces_missing() is not None, reason=str(namespaces_missing()))
@pytest.mark.parametrize("name", ["docker run", "shardudp", "shardudp-multicast"])
def test_container_serves_and_stops_as_docker_would_run_it(name: str, tmp_path: Path) -> None:
    """The image alone ("docker run", writable root) and each compose service,
    the commented multicast one too (read-only root, its tmpfs and volumes):
    tini as PID 1 starts the master as the image's user; its own health check
    and `shardudp status` through `docker exec` answer; it echoes; SIGTERM to
    PID 1 stops everything with exit 0."""
    image = container.parse_image(DOCKERFILE)
    service = (None if name == "docker run"
               else container.parse_service(all_services()[name], DOCKER))
    config_path = image.cmd[image.cmd.index("--config") + 1]
    sources = {dst: REPO / src for src, dst in image.copies}
    mounted = {dst: Path(src) for src, dst, _ in service.volumes} if service else {}
    config = tomllib.loads({**sources, **mounted}[config_path].read_text())
    ports = relocation(config)
    files = {dst: relocate(src.read_text(), ports) for dst, src in sources.items()}
    if service:
        moved = []
        for i, (src, dst, read_only) in enumerate(service.volumes):
            copy = tmp_path / f"volume{i}-{Path(src).name}"
            copy.write_text(relocate(Path(src).read_text(), ports))
            copy.chmod(0o644)
            moved.append((str(copy), dst, read_only))
        service.volumes = moved
    probe = (service and service.healthcheck) or image.healthcheck
    probe = [relocate(f'"{a}"', ports)[1:-1] for a in probe]

    with container.running(image, service, tmp_path, files, probe, "container") as box:
        # docker exec finds the control socket through the image's environment.
        status = box.exec(["shardudp", "status", "--json"])
        assert status.returncode == 0, status.stdout
        reply = json.loads(status.stdout)
        workers = container.container_env(image, service).get("SHARDUDP_WORKERS",
                                                              config["workers"])
        assert reply["healthy"] is True
        assert reply["workers"] == (usable_cpus() if workers == "auto" else int(workers))
        comm = Path(f"/proc/{box.pid1}/comm").read_text().strip()
        assert comm == Path(image.entrypoint[0]).name  # tini is PID 1
        assert os.stat(f"/proc/{box.pid1}").st_uid == image.user[0]

        assert_every_bind_echoes(config, ports)

        os.kill(box.pid1, signal.SIGTERM)  # docker stop
        assert box.proc.wait(timeout=30) == 0, box.log.read_text()
        assert session_pids(box.proc.pid) == []
        assert "Traceback" not in box.log.read_text(), box.log.read_text()
