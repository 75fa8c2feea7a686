"""deploy/prometheus and the Prometheus side of the deploy files: the rules
pass `promtool check rules` and their unit tests (`promtool test rules`, a
firing and a quiet case for every alert); every alert has its runbook in
deploy/README.md; a real Prometheus (Debian's `prometheus` package) scrapes a
running shardudp and counts exactly the datagrams sent, evaluates the rules on
the real series without error, and `promtool check metrics` finds nothing to
say about the live exposition; the Ansible role installs the rules and writes
file_sd targets for the inventory's hosts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploytools import DEPLOY, ROLE, run, tool, tool_env
from harness import STARTED_SESSIONS, Flows, free_tcp_port, serving, session_pids
from prometheus_client.parser import text_string_to_metric_families

PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES = PROMETHEUS_DIR / "shardudp.rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "shardudp.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "shardudp.json"
README = DEPLOY / "README.md"
#: The scrape job the alerts expect.
JOB = "shardudp"

#: Series exported only in some states, which the live server of the test is
#: not in: a slot nobody reads, a listener with session keeping.
PENDING = {
    "shardudp_slot_not_serving",
    "shardudp_sessions_draining",
    "shardudp_sessions_drained_total",
    "shardudp_sessions_cut_total",
    "shardudp_flows_moved_total",
}


def promtool_missing() -> str | None:
    if shutil.which("promtool") is None:
        return ("promtool not installed (Debian's prometheus package ships it; .ci/run "
                "installs it as root)")
    return None


def prometheus_missing() -> str | None:
    if shutil.which("prometheus") is None:
        return "prometheus not installed (Debian's prometheus package; .ci/run installs it as root)"
    return None


def rules_doc() -> dict[str, Any]:
    doc = yaml.safe_load(RULES.read_text())
    assert isinstance(doc, dict)
    return doc


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rules_doc()["groups"] for r in g["rules"] if "alert" in r}


def recordings() -> dict[str, dict[str, Any]]:
    return {r["record"]: r for g in rules_doc()["groups"] for r in g["rules"] if "record" in r}


# -- promtool


@pytest.mark.skipif(promtool_missing() is not None, reason=str(promtool_missing()))
def test_promtool_check_rules() -> None:
    res = run(["promtool", "check", "rules", str(RULES)], timeout=60)
    assert res.returncode == 0, res.stdout
    assert f"SUCCESS: {len(alerts()) + len(recordings())} rules found" in res.stdout


@pytest.mark.skipif(promtool_missing() is not None, reason=str(promtool_missing()))
def test_promtool_test_rules() -> None:
    res = run(["promtool", "test", "rules", str(RULE_TESTS)], cwd=PROMETHEUS_DIR, timeout=120)
    assert res.returncode == 0, res.stdout
    assert "SUCCESS" in res.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    assert doc["rule_files"] == [RULES.name]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alerts())
    assert names - fires == set(), "alerts never expected to fire"
    assert names - quiet == set(), "alerts never expected to stay quiet"
    assert fires | quiet <= names
    # The list, one alert each.
    assert names == {"ShardudpSlotNotServing", "ShardudpWorkerRestarts", "ShardudpKernelDrops",
                     "ShardudpHandlerErrors", "ShardudpReceiveQueueNearFull",
                     "ShardudpDatapathFallback", "ShardudpTargetMissing"}
    # The recording rules are exercised too.
    tested = " ".join(t["expr"] for case in doc["tests"]
                      for t in case.get("promql_expr_test", []))
    assert any(name in tested for name in recordings())


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_alert_has_summary_description_and_a_runbook() -> None:
    readme = README.read_text()
    anchors = {github_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", readme, re.M)}
    for name, rule in alerts().items():
        notes = rule["annotations"]
        assert notes["summary"].strip() and notes["description"].strip(), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        doc, _, anchor = notes["runbook"].partition("#")
        assert doc == "deploy/README.md" and anchor == github_anchor(name), name
        assert anchor in anchors, f"{name}: no section {name} in deploy/README.md"
        # A runbook paragraph, not only a heading.
        section = readme.split(f"\n#### {name}\n", 1)[1].split("\n#", 1)[0]
        assert len(section.split()) >= 40, f"{name}: runbook too short"
    # ... and the only job the rules name is the one every scrape config uses.
    assert set(re.findall(r'job="([^"]+)"', RULES.read_text())) == {JOB}


def test_recording_rules_keep_listeners_per_server() -> None:
    for name, rule in recordings().items():
        assert name.startswith("listener:shardudp_"), name
        # Slots are summed; the listener and every target label stay.
        assert "without (slot" in rule["expr"], name
        assert " by (" not in rule["expr"], name


# -- metric names


NAME = re.compile(r"(?<![:\w])shardudp_[a-z_]+(?![:\w])")


def used_names() -> dict[str, set[str]]:
    """Metric names queried by the rules and by the dashboard."""
    rules = {n for r in alerts().values() for n in NAME.findall(r["expr"])}
    rules |= {n for r in recordings().values() for n in NAME.findall(r["expr"])}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return {"rules": rules, "dashboard": {n for e in exprs for n in NAME.findall(e)}}


def test_dashboard_shows_the_data_path_and_the_serving_state() -> None:
    names = used_names()["dashboard"]
    assert {"shardudp_datapath_info", "shardudp_slot_serving",
            "shardudp_datagrams_steered_total"} <= names
    assert {n for n in PENDING if n.startswith("shardudp_sessions_")} <= names
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # No two panels cover the same cell of Grafana's 24-column grid.
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, (p["title"], cells.get((x, y)))
                cells[(x, y)] = p["title"]


# -- a real Prometheus


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    # Loopback only: no proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def poll(check: Callable[[], Any], timeout: float, what: str,
         alive: Callable[[], bool] = lambda: True) -> Any:
    """``check()`` until it returns something truthy, bounded in count and time."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.1) + 10):
        result = check()
        if result:
            return result
        if time.monotonic() > deadline or not alive():
            break
        select.select([], [], [], 0.1)
    raise AssertionError(f"{what}: not within {timeout} s" if alive() else f"{what}: exited")


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> bool:
        return http_get(f"{self.url}/-/ready")[0] == 200

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = http_get(f"{self.url}/api/v1/{path}{query}")
        if status != 200:
            return None
        reply = json.loads(body)
        assert reply["status"] == "success", reply
        return reply["data"]

    def value(self, query: str) -> float | None:
        data = self.api("query", query=query)
        if not data or not data["result"]:
            return None
        (sample,) = data["result"]
        return float(sample["value"][1])


@contextlib.contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[Prometheus]:
    """Debian's prometheus on a free loopback port, its config and storage in
    ``tmp_path``, scraping ``target`` every second and evaluating our rules."""
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
    }))
    for attempt in range(3):
        port = free_tcp_port()
        log = tmp_path / f"prometheus{attempt}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["prometheus", f"--config.file={config}",
                 f"--storage.tsdb.path={tmp_path / f'data{attempt}'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=tmp_path, start_new_session=True)
        # The leak check (conftest.py) covers it like a shardudp server.
        STARTED_SESSIONS.add(proc.pid)
        prom = Prometheus(proc, f"http://127.0.0.1:{port}", log)
        try:
            try:
                poll(prom.ready, 30.0, "prometheus ready", prom.alive)
            except AssertionError:
                if "address already in use" in log.read_text() and attempt < 2:
                    continue  # the free port was taken meanwhile
                raise AssertionError(log.read_text()) from None
            yield prom
            return
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            for pid in session_pids(proc.pid):
                os.kill(pid, signal.SIGKILL)


SENT = 1000


@pytest.mark.skipif(prometheus_missing() is not None, reason=str(prometheus_missing()))
def test_real_prometheus_counts_the_datagrams_sent(tmp_path: Path) -> None:
    with serving("echo", workers=2, extra=["--metrics", "127.0.0.1:0"]) as (srv,
                                                                                        port):
        metrics_port = int(srv.wait_line(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")[0]
                           .group(1))
        listener = f"udp-127.0.0.1:{port}"
        target = f"127.0.0.1:{metrics_port}"
        with prometheus(tmp_path, target) as prom:
            # Scraped once before anything is sent, so rates have a start.
            poll(lambda: prom.value(f'up{{job="{JOB}"}}') == 1.0, 20.0, "first scrape",
                 prom.alive)
            assert prom.value(f'sum(shardudp_datagrams_received_total{{job="{JOB}"}})') == 0.0

            # Every datagram is echoed: each one was received.
            with Flows(8, port) as flows:
                for i in range(SENT):
                    flows.send(i % 8, b"%06d" % i)
                    if i % 100 == 99:
                        assert len(flows.collect(100, timeout=10.0)) == 100
            query = (f'sum(shardudp_datagrams_received_total'
                     f'{{job="{JOB}",listener="{listener}"}})')
            answers: list[float | None] = []

            def counted() -> bool:
                answers.append(prom.value(query))
                return answers[-1] == SENT

            try:
                poll(counted, 20.0, "Prometheus's count", prom.alive)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; answers {answers[-5:]}, sent {SENT}") from None
            # Per slot too: the slots' series add up to what was sent.
            data = prom.api("query", query=f'shardudp_datagrams_received_total{{job="{JOB}"}}')
            assert sum(float(s["value"][1]) for s in data["result"]) == SENT
            assert {s["metric"]["slot"] for s in data["result"]} == {"0", "1"}

            # The rules evaluate on the real series: no errors, and the
            # per-listener rate is there.
            rate = f'listener:shardudp_datagrams_received:rate5m{{listener="{listener}"}}'
            poll(lambda: (prom.value(rate) or 0) > 0, 20.0, "recording rule", prom.alive)
            evaluated = time.time()

            def rules_evaluated_since() -> list[dict[str, Any]] | None:
                groups = prom.api("rules")["groups"]
                rules = [r for g in groups for r in g["rules"]]
                done = all(_timestamp(r["lastEvaluation"]) > evaluated for r in rules)
                return rules if done else None

            rules = poll(rules_evaluated_since, 20.0, "rule evaluation", prom.alive)
            assert len(rules) == len(alerts()) + len(recordings())
            assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
            firing = [r["name"] for r in rules if r.get("state") == "firing"]
            assert firing == []

            # promtool has nothing to say about the live exposition.
            status, body = http_get(f"http://{target}/metrics")
            assert status == 200
            if promtool_missing() is None:
                res = subprocess.run(["promtool", "check", "metrics"], input=body,
                                     capture_output=True, timeout=60, check=False)
                assert (res.returncode, res.stdout, res.stderr) == (0, b"", b"")

            # The rules and the dashboard name only series shardudp exports
            # (or exports in states this server is not in: PENDING).
            live = {s.name for fam in text_string_to_metric_families(body.decode())
                    for s in fam.samples}
            for where, names in used_names().items():
                assert names - live - PENDING == set(), where


def _timestamp(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 time as Prometheus's API gives it."""
    from datetime import datetime

    # Go prints up to nanoseconds; Python parses microseconds.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


@pytest.mark.skipif(promtool_missing() is not None, reason=str(promtool_missing()))
def test_promtool_check_metrics_flags_a_bad_exposition() -> None:
    """The live check above is not vacuous: promtool does complain."""
    bad = b"# TYPE shardudp_x counter\nshardudp_x 1\n"
    res = subprocess.run(["promtool", "check", "metrics"], input=bad, capture_output=True,
                         timeout=60, check=False)
    assert res.returncode != 0 or res.stdout or res.stderr


# -- the Ansible role: rules and file_sd targets


def test_role_ships_the_rules_unchanged() -> None:
    assert (ROLE / "files" / RULES.name).read_bytes() == RULES.read_bytes()


INVENTORY = """\
all:
  children:
    shardudp:
      children:
        frontends:
          hosts:
            fe-1.example.internal:
              ansible_host: 192.0.2.11
            fe-2.example.internal:
            fe-v6.example.internal:
              shardudp_metrics: "[2001:db8::5]:29111"
          vars:
            shardudp_metrics: "0.0.0.0:29110"
        loopback_only:
          hosts:
            # The role's default, 127.0.0.1:29110: nothing to scrape remotely.
            lo-1.example.internal:
    prometheus:
      hosts:
        localhost:
          ansible_connection: local
          ansible_python_interpreter: {python}
          ansible_become: false
"""

PLAYBOOK = """\
- name: Prometheus targets and rules for shardudp
  hosts: prometheus
  gather_facts: false
  tasks:
    - name: Install the rules and the file_sd targets
      ansible.builtin.include_role:
        name: shardudp
        tasks_from: prometheus
"""


def test_role_installs_rules_and_file_sd_targets_for_the_inventory(tmp_path: Path) -> None:
    import sys

    inventory = tmp_path / "inventory.yml"
    inventory.write_text(INVENTORY.format(python=sys.executable))
    playbook = tmp_path / "prometheus.yml"
    playbook.write_text(PLAYBOOK)
    variables = tmp_path / "vars.json"
    rules_dir, sd_dir = tmp_path / "etc" / "rules", tmp_path / "etc" / "file_sd"
    variables.write_text(json.dumps({
        "shardudp_prometheus_rules_dir": str(rules_dir),
        "shardudp_prometheus_file_sd_dir": str(sd_dir),
        "shardudp_prometheus_labels": {"env": "test"},
        # No Prometheus service to reload here.
        "shardudp_prometheus_reload": False,
        "shardudp_prometheus_validate": promtool_missing() is None,
    }))
    cmd = [tool("ansible-playbook"), "-i", str(inventory), "-e", f"@{variables}", str(playbook)]
    first = run(cmd, env=tool_env(tmp_path))
    assert first.returncode == 0, first.stdout
    assert (rules_dir / RULES.name).read_bytes() == RULES.read_bytes()
    targets = json.loads((sd_dir / "shardudp.json").read_text())
    assert targets == [{
        "targets": ["192.0.2.11:29110", "[2001:db8::5]:29111", "fe-2.example.internal:29110"],
        "labels": {"env": "test"},
    }]
    # The host Prometheus cannot reach is named, not silently left out.
    flat = " ".join(first.stdout.split())
    assert "lo-1.example.internal" in flat and "loopback" in flat
    second = run(cmd, env=tool_env(tmp_path))
    assert second.returncode == 0, second.stdout
    assert re.search(r"changed=0\s", second.stdout), second.stdout
