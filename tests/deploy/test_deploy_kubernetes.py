"""deploy/kubernetes, offline: both overlays render (by this file's own small
kustomize, compared with `kubectl kustomize` where kubectl is installed),
every rendered manifest validates strictly against a pinned Kubernetes
version, the ConfigMap's config passes `shardudp check` with the pod's
environment, and the pods agree with the image, the config and each other.

No cluster is involved: nothing here is applied anywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import time
import tomllib
from pathlib import Path
from typing import Any

import container
import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploytools import DEPLOY, DOCKER, run
from harness import child_env, run_cli, session_pids

from shardudp.cli import usable_cpus

KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = {name: KUBERNETES / "overlays" / name for name in ("per-node", "service")}
#: The oldest Kubernetes the manifests are for, and a current one: every field
#: used must exist in both (strict mode refuses unknown fields).
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
WORKLOADS = {"per-node": "DaemonSet", "service": "Deployment"}
CONFIG_KEY = "shardudp.toml"
METRICS_PORT = 29110

Resource = dict[str, Any]


# -- a small kustomize: what the overlays use, and nothing more


class Unsupported(Exception):
    """The kustomization uses something this renderer does not implement."""


def _generated_name(cm: Resource) -> str:
    """A content hash suffix, in kustomize's alphabet (the value differs from
    kustomize's own; comparisons mask it)."""
    body = json.dumps({"data": cm.get("data", {}), "kind": "ConfigMap",
                       "name": cm["metadata"]["name"]}, sort_keys=True)
    digest = hashlib.sha256(body.encode()).hexdigest()[:10]
    return f"{cm['metadata']['name']}-{digest.translate(str.maketrans('013ae', 'ghkmt'))}"


def strategic_merge(target: Any, patch: Any) -> Any:
    """A strategic merge patch as far as the overlays need it: maps merge, a
    null deletes, lists of named items merge by name, other lists are replaced."""
    if isinstance(target, dict) and isinstance(patch, dict):
        out = dict(target)
        for key, value in patch.items():
            if key.startswith("$"):
                raise Unsupported(f"patch directive {key}")
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value)
            else:
                out[key] = value
        return out
    if (isinstance(target, list) and isinstance(patch, list)
            and all(isinstance(x, dict) and "name" in x for x in target + patch)):
        out_list = [dict(x) for x in target]
        for item in patch:
            same = [i for i, x in enumerate(out_list) if x["name"] == item["name"]]
            if same:
                out_list[same[0]] = strategic_merge(out_list[same[0]], item)
            else:
                out_list.append(item)
        return out_list
    return copy.deepcopy(patch)


def _kustomize(directory: Path, generated: set[str]) -> list[Resource]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - {"apiVersion", "kind", "resources", "configMapGenerator",
                        "generatorOptions", "patches"}
    if unknown:
        raise Unsupported(f"{directory}: {sorted(unknown)}")
    out: list[Resource] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        out += (_kustomize(path, generated) if path.is_dir()
                else [d for d in yaml.safe_load_all(path.read_text()) if d])
    options = k.get("generatorOptions", {})
    if set(options) - {"labels"}:
        raise Unsupported(f"generatorOptions {sorted(options)}")
    for gen in k.get("configMapGenerator", []):
        if set(gen) - {"name", "files", "behavior"} or any("=" in f for f in gen["files"]):
            raise Unsupported(f"configMapGenerator {gen}")
        cm: Resource = {"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": gen["name"]},
                        "data": {Path(f).name: (directory / f).read_text() for f in gen["files"]}}
        if options.get("labels"):
            cm["metadata"]["labels"] = dict(options["labels"])
        same = [i for i, r in enumerate(out)
                if r["kind"] == "ConfigMap" and r["metadata"]["name"] == gen["name"]]
        behavior = gen.get("behavior", "create")
        if behavior == "create" and not same:
            out.append(cm)
        elif behavior == "replace" and same:
            # kustomize keeps the replaced one's labels (the base's options).
            labels = {**out[same[0]]["metadata"].get("labels", {}),
                      **cm["metadata"].get("labels", {})}
            out[same[0]] = cm
            if labels:
                cm["metadata"]["labels"] = labels
        else:
            raise Unsupported(f"configMapGenerator {gen['name']}: behavior {behavior}")
        generated.add(gen["name"])
    for patch in k.get("patches", []):
        if set(patch) != {"path"}:
            raise Unsupported(f"patch {patch}")
        body = yaml.safe_load((directory / patch["path"]).read_text())
        same = [i for i, r in enumerate(out) if (r["kind"], r["metadata"]["name"])
                == (body["kind"], body["metadata"]["name"])]
        if len(same) != 1:
            raise Unsupported(f"patch {patch['path']} matches {len(same)} resources")
        out[same[0]] = strategic_merge(out[same[0]], body)
    return out


def render_here(directory: Path) -> list[Resource]:
    """``kubectl kustomize DIRECTORY``, for the features the overlays use."""
    generated: set[str] = set()
    out = _kustomize(directory, generated)
    renamed = {}
    for r in out:
        if r["kind"] == "ConfigMap" and r["metadata"]["name"] in generated:
            renamed[r["metadata"]["name"]] = r["metadata"]["name"] = _generated_name(r)
    # References to a generated ConfigMap follow its new name.
    for r in out:
        if "template" not in r.get("spec", {}):
            continue
        for vol in pod_spec(r).get("volumes", []):
            if "configMap" in vol:
                vol["configMap"]["name"] = renamed.get(vol["configMap"]["name"],
                                                       vol["configMap"]["name"])
        for c in pod_spec(r)["containers"]:
            if c.get("envFrom") or any("configMapKeyRef" in e.get("valueFrom", {})
                                       for e in c.get("env", [])):
                raise Unsupported("ConfigMap references from env")
    return out


def render_kubectl(directory: Path) -> list[Resource]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    res = run([kubectl, "kustomize", str(directory)], timeout=60)
    assert res.returncode == 0, res.stdout
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def pod_spec(workload: Resource) -> dict[str, Any]:
    spec = workload["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def by_kind(resources: list[Resource]) -> dict[str, Resource]:
    kinds = [r["kind"] for r in resources]
    assert len(kinds) == len(set(kinds)), kinds
    return {r["kind"]: r for r in resources}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Resource]]:
    return {name: by_kind(render_here(path)) for name, path in OVERLAYS.items()}


def container_of(workload: Resource) -> dict[str, Any]:
    (c,) = pod_spec(workload)["containers"]
    assert isinstance(c, dict)
    return c


# -- rendering


@pytest.mark.skipif(shutil.which("kubectl") is None,
                    reason="kubectl not installed: the overlays are rendered by this test's "
                           "own kustomize only, not compared with kubectl's")
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_kubectl_kustomize_renders_what_the_suite_renders(overlay: str) -> None:
    def masked(resources: list[Resource]) -> dict[tuple[str, str], str]:
        # Generated names carry a content hash; ours is not kustomize's.
        text = {(r["kind"], r["metadata"]["name"]): json.dumps(r, sort_keys=True)
                for r in resources}
        hashed = re.compile(r'"(shardudp)-[2456789bcdfghkmt]{10}"')
        return {(kind, hashed.sub(r'"\1-HASH"', f'"{name}"')): hashed.sub(r'"\1-HASH"', body)
                for (kind, name), body in text.items()}

    ours = render_here(OVERLAYS[overlay])
    theirs = render_kubectl(OVERLAYS[overlay])
    assert masked(ours) == masked(theirs)
    # Both name the ConfigMap after its content, and the workload follows it.
    for resources in (ours, theirs):
        kinds = by_kind(resources)
        name = kinds["ConfigMap"]["metadata"]["name"]
        assert re.fullmatch(r"shardudp-[2456789bcdfghkmt]{10}", name)
        (vol,) = [v for v in pod_spec(kinds[WORKLOADS[overlay]])["volumes"] if "configMap" in v]
        assert vol["configMap"]["name"] == name


def test_a_changed_config_gets_a_new_configmap_name(tmp_path: Path) -> None:
    # The hash suffix is what rolls the pods when the config changes.
    shutil.copytree(KUBERNETES, tmp_path / "kubernetes")
    before = by_kind(render_here(tmp_path / "kubernetes" / "overlays" / "service"))
    toml = tmp_path / "kubernetes" / "base" / CONFIG_KEY
    toml.write_text(toml.read_text().replace('log_level = "info"', 'log_level = "debug"'))
    after = by_kind(render_here(tmp_path / "kubernetes" / "overlays" / "service"))
    assert before["ConfigMap"]["metadata"]["name"] != after["ConfigMap"]["metadata"]["name"]


def test_overlays_render_the_expected_resources(rendered: dict[str, dict[str, Resource]]) -> None:
    assert set(rendered["per-node"]) == {"ConfigMap", "DaemonSet", "PodDisruptionBudget",
                                         "PodMonitor"}
    assert set(rendered["service"]) == {"ConfigMap", "Deployment", "Service",
                                        "PodDisruptionBudget", "PodMonitor"}


# -- strict validation


#: prometheus-operator's PodMonitor is not a Kubernetes kind, so
#: kubernetes-validate has no schema for it. This one covers the fields the
#: overlays use, with the operator's names and types, and refuses any other.
DURATION = {"type": "string",
            "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                       r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PODMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "additionalProperties": False, "required": ["name"],
                     "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                                    "labels": STRING_MAP, "annotations": STRING_MAP}},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector"],
            "properties": {
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": STRING_MAP}},
                "podMetricsEndpoints": {
                    "type": "array", "minItems": 1,
                    "items": {"type": "object", "additionalProperties": False,
                              "required": ["port"],
                              "properties": {"port": {"type": "string"},
                                             "path": {"type": "string"},
                                             "scheme": {"enum": ["http", "https"]},
                                             "interval": DURATION,
                                             "scrapeTimeout": DURATION}}},
            },
        },
    },
}


def validation_errors(resource: Resource, version: str) -> list[str]:
    name = f"{resource['kind']}/{resource['metadata']['name']}"
    if resource["kind"] == "PodMonitor":
        validator = jsonschema.Draft202012Validator(PODMONITOR_SCHEMA)
        return [f"{name}: {'.'.join(map(str, e.path))}: {e.message}"
                for e in validator.iter_errors(resource)]
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{name}: {'.'.join(map(str, e.path))}: {e.message}"]
    return []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rendered_manifests_validate_strictly(
        rendered: dict[str, dict[str, Resource]], overlay: str, version: str) -> None:
    errors = [e for r in rendered[overlay].values() for e in validation_errors(r, version)]
    assert errors == []


def test_strict_validation_refuses_a_misspelt_field(
        rendered: dict[str, dict[str, Resource]]) -> None:
    """The validation above would catch a typo (it is not a silent pass)."""
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "PodMonitor"):
        bad = copy.deepcopy(rendered["service"][kind])
        bad["spec"]["replicaz" if kind == "Deployment" else "selectr"] = {}
        assert validation_errors(bad, KUBERNETES_VERSIONS[0]), kind
    bad = copy.deepcopy(rendered["per-node"]["DaemonSet"])
    container_of(bad)["readinessProbe"]["exec"]["comand"] = ["true"]
    assert validation_errors(bad, KUBERNETES_VERSIONS[0])


# -- the config in the ConfigMap


def pod_environment(workload: Resource, tmp_path: Path) -> dict[str, str]:
    """What the container's env gives shardudp on a node, for `shardudp check`."""
    c = container_of(workload)
    env = {"SHARDUDP_CONTROL": str(tmp_path / "control" / "control.sock")}
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        source = item["valueFrom"]
        if "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            assert ref["resource"] == "limits.cpu" and str(ref["divisor"]) == "1", ref
            # The downward API rounds the CPU limit up to whole CPUs.
            env[item["name"]] = str(math.ceil(cpus(c["resources"]["limits"]["cpu"])))
        elif source.get("fieldRef", {}).get("fieldPath") == "status.hostIP":
            env[item["name"]] = "127.0.0.1"  # the node's address, on this machine
        else:
            raise AssertionError(f"no stand-in for {item}")
    return env


def cpus(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_configmap_config_passes_shardudp_check(
        rendered: dict[str, dict[str, Resource]], overlay: str, tmp_path: Path) -> None:
    kinds = rendered[overlay]
    config = tmp_path / CONFIG_KEY
    config.write_text(kinds["ConfigMap"]["data"][CONFIG_KEY])
    workload = kinds[WORKLOADS[overlay]]
    env = {k: v for k, v in child_env().items() if not k.startswith("SHARDUDP_")}
    env.update(pod_environment(workload, tmp_path))
    res = run_cli("check", "--config", str(config), "--print-config", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    merged = json.loads(res.stdout)

    # The config the container is started with is the one mounted from the ConfigMap.
    c = container_of(workload)
    path = Path(c["args"][c["args"].index("--config") + 1])
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "config"]
    assert path.parent == Path(mount["mountPath"]) and path.name == CONFIG_KEY
    # Probes and scrapes find the metrics where the config serves them.
    assert merged["metrics"] == f"0.0.0.0:{METRICS_PORT}"
    # The graceful stop (and any pause before it) fits in the grace period.
    pause = 0
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if pre_stop:
        assert pre_stop[0] == "sleep", pre_stop
        pause = int(pre_stop[1])
    assert pod_spec(workload)["terminationGracePeriodSeconds"] >= (
        pause + merged["graceful_timeout"] + 5)
    if overlay == "service":
        # One worker per CPU of the limit.
        assert merged["workers"] == math.ceil(cpus(c["resources"]["limits"]["cpu"]))
    else:
        # All the node's cores, and the multicast group joined on the node's address.
        assert tomllib.loads(config.read_text())["workers"] == "auto"
        (mcast,) = [lst for lst in merged["listener"] if "multicast" in lst]
        assert mcast["multicast_interface"] == "127.0.0.1"


def test_the_configmap_toml_is_the_file_kustomize_was_given(
        rendered: dict[str, dict[str, Resource]]) -> None:
    assert (rendered["service"]["ConfigMap"]["data"][CONFIG_KEY]
            == (KUBERNETES / "base" / CONFIG_KEY).read_text())
    assert (rendered["per-node"]["ConfigMap"]["data"][CONFIG_KEY]
            == (OVERLAYS["per-node"] / CONFIG_KEY).read_text())


# -- the pods


def test_pods_follow_the_image(rendered: dict[str, dict[str, Resource]]) -> None:
    image = container.parse_image(DOCKER / "Dockerfile")
    for overlay, kinds in rendered.items():
        workload = kinds[WORKLOADS[overlay]]
        pod, c = pod_spec(workload), container_of(workload)
        # Non-root, by the image's numbers, with nothing writable but /tmp.
        ctx = pod["securityContext"]
        assert (ctx["runAsUser"], ctx["runAsGroup"]) == image.user != (0, 0), overlay
        assert ctx["runAsNonRoot"] is True and c["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        # The control socket's directory (the image's SHARDUDP_CONTROL) is on
        # a writable volume: without it the master refuses to start.
        control = Path(image.env["SHARDUDP_CONTROL"])
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert any(control.is_relative_to(p) for p in writable), overlay
        tmp = {v["name"]: v for v in pod["volumes"]}["tmp"]
        assert "emptyDir" in tmp
        # The probes are the image's HEALTHCHECK.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["exec"]["command"] == image.healthcheck, (overlay, probe)
            assert c[probe]["timeoutSeconds"] > float(
                image.healthcheck[image.healthcheck.index("--http-timeout") + 1])
        assert f"127.0.0.1:{METRICS_PORT}" in image.healthcheck
        # Liveness gives the master's own restarts (backoff_max, 30 s) time.
        live = c["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > 30
        # The image's entrypoint (tini) stays; the args are its CMD's.
        assert "command" not in c and c["args"] == image.cmd
        # Requests and limits are set; memory is limited.
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert c["resources"]["limits"]["memory"]
        # No service links (SHARDUDP_* variables from a Service named shardudp),
        # no API token.
        assert pod["enableServiceLinks"] is False
        assert pod["automountServiceAccountToken"] is False


def test_both_workloads_run_the_same_container(rendered: dict[str, dict[str, Resource]]) -> None:
    """The pod templates are written twice (a DaemonSet, a Deployment): they may
    differ only where the overlays mean to."""
    own = {"env", "ports", "resources", "lifecycle"}
    per_node = container_of(rendered["per-node"]["DaemonSet"])
    service = container_of(rendered["service"]["Deployment"])
    assert {k: v for k, v in per_node.items() if k not in own} == {
        k: v for k, v in service.items() if k not in own}
    pod_own = {"containers", "hostNetwork", "dnsPolicy", "topologySpreadConstraints",
               "volumes"}
    assert {k: v for k, v in pod_spec(rendered["per-node"]["DaemonSet"]).items()
            if k not in pod_own} == {
        k: v for k, v in pod_spec(rendered["service"]["Deployment"]).items() if k not in pod_own}


def test_selectors_ports_and_scrape_agree(rendered: dict[str, dict[str, Resource]]) -> None:
    for overlay, kinds in rendered.items():
        workload = kinds[WORKLOADS[overlay]]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        for kind in ("PodDisruptionBudget", "PodMonitor"):
            assert kinds[kind]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ports = {p["name"]: p for p in container_of(workload)["ports"]}
        assert ports["metrics"]["containerPort"] == METRICS_PORT
        assert ports["metrics"]["protocol"] == "TCP"
        config = tomllib.loads(kinds["ConfigMap"]["data"][CONFIG_KEY])
        udp = {int((lst.get("bind") or lst["multicast"]).rsplit(":", 1)[1])
               for lst in config["listener"]}
        assert {p["containerPort"] for p in ports.values() if p["protocol"] == "UDP"} == udp
        (endpoint,) = kinds["PodMonitor"]["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
        # job="shardudp", which the alerting rules expect.
        job_label = kinds["PodMonitor"]["spec"]["jobLabel"]
        assert labels[job_label] == "shardudp"
        # Every resource carries the name label.
        for r in kinds.values():
            assert r["metadata"]["labels"]["app.kubernetes.io/name"] == "shardudp"


def test_per_node_overlay_uses_the_nodes_network(rendered: dict[str, dict[str, Resource]]) -> None:
    ds = rendered["per-node"]["DaemonSet"]
    pod, c = pod_spec(ds), container_of(ds)
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    # With hostNetwork the container ports are the node's: declared as such.
    assert all(p["hostPort"] == p["containerPort"] for p in c["ports"])
    # No surge: a second pod on the node would need the same ports.
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
    # All the node's cores: no CPU limit to throttle workers = "auto".
    assert "cpu" not in c["resources"]["limits"]
    # A DaemonSet takes only an integer minAvailable.
    pdb = rendered["per-node"]["PodDisruptionBudget"]["spec"]
    assert "maxUnavailable" not in pdb and isinstance(pdb["minAvailable"], int)


def test_service_overlay_keeps_client_addresses(rendered: dict[str, dict[str, Resource]]) -> None:
    svc = rendered["service"]["Service"]["spec"]
    deploy = rendered["service"]["Deployment"]
    assert svc["type"] == "LoadBalancer" and svc["externalTrafficPolicy"] == "Local"
    assert svc["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p for p in container_of(deploy)["ports"]}
    for port in svc["ports"]:
        assert port["protocol"] == "UDP"
        assert ports[port["targetPort"]]["protocol"] == "UDP"
    # The metrics port is scraped from the pod, not published.
    assert METRICS_PORT not in {p["port"] for p in svc["ports"]}
    assert pod_spec(deploy).get("hostNetwork") is not True
    # Guaranteed QoS: requests equal limits.
    res = container_of(deploy)["resources"]
    assert res["requests"] == res["limits"]
    assert rendered["service"]["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert deploy["spec"]["replicas"] >= 2


def test_the_readme_names_both_overlays() -> None:
    text = (DEPLOY / "README.md").read_text()
    for overlay in OVERLAYS:
        assert f"overlays/{overlay}" in text, overlay
    assert "net.core.rmem_max" in text and "conntrack" in text


# -- the pod run as the kubelet would run it (container.py, as for Docker)


def pod_as_container(workload: Resource, configmap: Resource, ports: dict[int, int],
                     tmp_path: Path) -> tuple[container.Image, container.Service]:
    """The image as the pod spec runs it: its args, user, env, read-only root,
    emptyDir volumes as tmpfs, the ConfigMap as a read-only directory, and the
    exec probe as the health check; every bound port moved to a free one."""
    image = container.parse_image(DOCKER / "Dockerfile")
    pod, c = pod_spec(workload), container_of(workload)
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == image.user
    image = dataclasses.replace(image, cmd=list(c["args"]))
    volumes = {v["name"]: v for v in pod["volumes"]}
    service = container.Service(read_only=c["securityContext"]["readOnlyRootFilesystem"])
    env = pod_environment(workload, tmp_path)
    env.pop("SHARDUDP_CONTROL")  # the image's own
    service.environment = env
    for mount in c["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            assert volume["emptyDir"].get("medium") == "Memory"
            service.tmpfs.append(mount["mountPath"])
        else:
            directory = tmp_path / f"configmap-{mount['name']}"
            directory.mkdir(mode=0o755)
            directory.chmod(0o755)
            for key, text in configmap["data"].items():
                (directory / key).write_text(docker_tests().relocate(text, ports))
                (directory / key).chmod(0o644)
            service.volumes.append((str(directory), mount["mountPath"], bool(mount["readOnly"])))
    probe = c["readinessProbe"]["exec"]["command"]
    service.healthcheck = [docker_tests().relocate(f'"{a}"', ports)[1:-1] for a in probe]
    return image, service


def docker_tests() -> Any:
    """test_deploy_docker's container helpers (port relocation, polling)."""
    import test_deploy_docker

    return test_deploy_docker


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_pod_serves_and_stops_as_the_kubelet_would_run_it(
        rendered: dict[str, dict[str, Resource]], overlay: str, tmp_path: Path) -> None:
    """Read-only root, /tmp an emptyDir, the ConfigMap mounted, the pod's env:
    the readiness probe passes, the server echoes (and reports the workers the
    overlay means), and SIGTERM stops it well within the grace period."""
    dt = docker_tests()
    why = dt.namespaces_missing()
    if why:
        pytest.skip(why)
    kinds = rendered[overlay]
    workload = kinds[WORKLOADS[overlay]]
    config = tomllib.loads(kinds["ConfigMap"]["data"][CONFIG_KEY])
    ports = dt.relocation(config)
    image, service = pod_as_container(workload, kinds["ConfigMap"], ports, tmp_path)

    assert service.healthcheck is not None
    with container.running(image, service, tmp_path, {}, service.healthcheck, "pod") as box:
        status = box.exec(["shardudp", "status", "--json"])
        assert status.returncode == 0, status.stdout
        workers = json.loads(status.stdout)["workers"]
        c = container_of(workload)
        assert workers == (math.ceil(cpus(c["resources"]["limits"]["cpu"]))
                           if overlay == "service" else usable_cpus())
        dt.assert_every_bind_echoes(config, ports)

        # The kubelet's SIGTERM goes to PID 1 (tini), after any preStop hook.
        started_at = time.monotonic()
        os.kill(box.pid1, signal.SIGTERM)
        grace = pod_spec(workload)["terminationGracePeriodSeconds"]
        assert box.proc.wait(timeout=grace) == 0, box.log.read_text()
        assert time.monotonic() - started_at < grace / 2
        assert session_pids(box.proc.pid) == []
        assert "Traceback" not in box.log.read_text(), box.log.read_text()
