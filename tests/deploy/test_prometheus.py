"""deploy/prometheus against the real things: promtool checks the rules, runs their unit tests and checks the example
config; the rules name only metrics a real server exposes; and a real Prometheus loaded with the rules scrapes two
`embedpool serve` replicas on one Postgres: the autoscaling query follows their load as the replicas themselves
report it, every dashboard query runs on it, readiness follows the database, and a killed replica shows as down.
The helpers for rule and dashboard queries are shared with test_dashboard."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from prometheus_client.parser import text_string_to_metric_families

from embedpool.store.embedded import EmbeddedPostgres
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

# Appended, not prepended: bench/tokenize.py must not shadow the standard library's tokenize.
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))

from _fleet import Fleet, free_port, program  # type: ignore[import-not-found,unused-ignore]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = DEPLOY / "rules.yml"
DASHBOARD = DEPLOY.parent / "grafana" / "embedpool.json"
# What Grafana substitutes before a query reaches Prometheus, to run the dashboard's queries without it.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*", "$tenant": ".*"}
JOB = "embedpool"  # rules.yml's up{} alerts want "embedpool" in the job's name
SATURATION = "embedpool:saturation:ratio"

# Load: per replica, CALLERS closed-loop callers each keep one Embed of DOCUMENTS in flight; the replicas admit
# exactly that many documents, so the budget stays (nearly) full and nothing is refused.
CALLERS = 2
DOCUMENTS = 16
CAPACITY = CALLERS * DOCUMENTS

T = TypeVar("T")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [program("promtool", "prometheus"), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(DEPLOY / "rules_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout + tested.stderr


def test_example_config_passes_promtool_check() -> None:
    checked = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_unit_tests_cover_every_alert_firing_and_silent() -> None:
    alerts = {rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule}
    fired: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load((DEPLOY / "rules_test.yml").read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert alerts - fired == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown silent"


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def dashboard_queries() -> list[str]:
    """Every query of every panel of the dashboard (rows' collapsed panels included), as Grafana has them."""
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            queries += [target["expr"] for target in inner.get("targets", [])]
    return queries


def filled(query: str) -> str:
    """`query` with Grafana's variables filled in (all jobs, replicas and tenants)."""
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    assert "$" not in query, f"a Grafana variable GRAFANA_VARIABLES lacks: {query}"
    return query


def referenced_names(expr: str) -> set[str]:
    """Metric and recording-rule names in a PromQL expression (label values and strings left out)."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"(?<![\w:])([a-z_]+:[a-z0-9_]+:[a-z0-9_]+|embedpool_[a-z0-9_]+)\b", expr))


def exposed_names(exposition: str) -> set[str]:
    """Every sample name an exposition's families stand for, observed yet or not: a counter's `_total`, a
    histogram's `_bucket`/`_sum`/`_count` (prometheus_client names them so)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in text_string_to_metric_families(exposition)
        for suffix in suffixes.get(family.type, ("",))
    }


class Replicas:
    """Two replicas on one embedded Postgres (which the test may stop and start again), /metrics on free ports."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.postgres = EmbeddedPostgres(root / "pg")
        url = self.postgres.start()
        try:
            self.fleet = Fleet(
                2,
                root,
                model_dir,
                url,
                metrics_port=0,
                max_concurrent_inputs=CAPACITY,
                max_request_documents=DOCUMENTS,
                intra_op_threads=1,
                db_pool_size=4,
            )
        except BaseException:
            self.postgres.close()
            raise
        # The metrics port is in the ready line's fields, beside the gRPC port.
        self.metrics_ports = [int(self.fleet.replica(i).logged("serving")[0]["metrics_port"]) for i in range(2)]

    @property
    def metrics_targets(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.metrics_ports]

    def metrics(self, i: int) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_ports[i]}/metrics", timeout=10).text

    def saturation(self) -> float:
        """The fleet's saturation as the replicas report it on their own /metrics."""
        in_use = capacity = 0.0
        for i in range(2):
            for family in text_string_to_metric_families(self.metrics(i)):
                if family.name == "embedpool_permits_in_use":
                    in_use += family.samples[0].value
                elif family.name == "embedpool_permits_capacity":
                    capacity += family.samples[0].value
        return in_use / capacity

    def close(self) -> None:
        try:
            self.fleet.close()
        finally:
            self.postgres.close()


class Prometheus:
    """Debian's `prometheus` on a free loopback port, scraping `targets` and evaluating rules.yml every second."""

    def __init__(self, targets: list[str], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = workdir / "prometheus.yml"
        # JSON is YAML: the config without a YAML writer.
        config.write_text(
            '{"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},'
            f' "rule_files": ["{RULES}"],'
            f' "scrape_configs": [{{"job_name": "{JOB}", "static_configs": [{{"targets": {_json_list(targets)}}}]}}]}}'
        )
        self.log = workdir / "prometheus.log"
        command = [
            program("prometheus", "prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        try:
            eventually(self._ready, 30, "prometheus to answer /-/ready")
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def api(self, path: str, **params: str) -> Any:
        answer = self.http.get(f"/api/v1/{path}", params=params).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> dict[str, float]:
        """An instant vector as {instance (or "" without one): value}."""
        return {r["metric"].get("instance", ""): float(r["value"][1]) for r in self.api("query", query=expr)["result"]}

    def scalar(self, expr: str) -> float | None:
        """The one value of a single-element result; None when the result is empty."""
        found = self.query(expr)
        assert len(found) <= 1, found
        return next(iter(found.values()), None)

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _json_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def eventually(check: Callable[[], T], timeout: float, what: str, seen: list[Any] | None = None) -> T:
    """The first truthy result of `check`, polled for at most `timeout` seconds; fails naming `what` and the last
    result (or the last of `seen`, what the check kept) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            last = repr(result) if seen is None else repr(seen[-5:])
            pytest.fail(f"waited {timeout:.0f} s for {what}; last: {last}")
        time.sleep(0.2)


class Load:
    """CALLERS closed-loop callers per target, each keeping one Embed of DOCUMENTS long texts in flight until
    `stop()`, which cancels the calls still running (the server releases their documents at once)."""

    def __init__(self, targets: list[str]) -> None:
        words = " ".join(f"word{i}" for i in range(60))
        self.request = pb.EmbedRequest(
            documents=[pb.Document(id=str(i), text=f"{i} {words}") for i in range(DOCUMENTS)], skip_vectors=True
        )
        self.channels = [grpc.insecure_channel(target) for target in targets]
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.in_flight: set[grpc.Future[Any]] = set()
        self.failures: list[str] = []
        self.threads = [
            threading.Thread(target=self._call, args=(pb_grpc.EmbedderStub(channel),), daemon=True)
            for channel in self.channels
            for _ in range(CALLERS)
        ]
        for thread in self.threads:
            thread.start()

    def _call(self, stub: pb_grpc.EmbedderStub) -> None:
        while not self.stopping.is_set():
            future = stub.Embed.future(self.request, timeout=120)
            with self.lock:
                self.in_flight.add(future)
            try:
                future.result()
            except grpc.FutureCancelledError:
                pass  # by stop()
            except grpc.RpcError as e:
                if not self.stopping.is_set():
                    self.failures.append(f"{e.code()}: {e.details()}")
            finally:
                with self.lock:
                    self.in_flight.discard(future)

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            for future in self.in_flight:
                future.cancel()
        for thread in self.threads:
            thread.join(timeout=30)
        for channel in self.channels:
            channel.close()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Replicas]:
    fleet = Replicas(tmp_path_factory.mktemp("replicas"), model_dir)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture(scope="module")
def prometheus(replicas: Replicas, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    server = Prometheus(replicas.metrics_targets, tmp_path_factory.mktemp("prometheus"))
    try:
        yield server
    finally:
        server.close()


def test_rules_name_only_metrics_a_real_server_exposes(replicas: Replicas) -> None:
    exposed = exposed_names(replicas.metrics(0))
    recorded = {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}
    referenced = set().union(*(referenced_names(rule["expr"]) for g in rule_groups() for rule in g["rules"]))
    assert {"embedpool_permits_in_use", "embedpool_rpc_duration_seconds_bucket"} <= referenced  # the parse works
    assert referenced - exposed - recorded == set(), "names neither on /metrics nor recorded by a rule"


def test_prometheus_scrapes_two_replicas_and_the_autoscaling_query_follows_their_load(
    replicas: Replicas, prometheus: Prometheus
) -> None:
    targets = set(replicas.metrics_targets)
    eventually(lambda: prometheus.query(f'up{{job="{JOB}"}} == 1').keys() == targets, 20, "both targets up")
    eventually(lambda: prometheus.scalar("count(embedpool_ready == 1)") == 2, 20, "2 replicas ready")
    assert prometheus.scalar("sum(embedpool_permits_capacity)") == 2 * CAPACITY
    assert eventually(lambda: prometheus.scalar(SATURATION) == 0.0, 20, "the saturation rule at 0 while idle")

    # Every group of rules.yml is loaded, and every rule evaluates without error.
    loaded = prometheus.api("rules")["groups"]
    assert {g["name"] for g in loaded} == {g["name"] for g in rule_groups()}
    rules = [rule for group in loaded for rule in group["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in rule_groups())
    assert [r["name"] for r in rules if r["health"] == "err"] == []

    load = Load(replicas.fleet.targets)
    try:
        seen: list[tuple[float, float | None, float]] = []

        def agreed() -> float:
            """Prometheus' saturation if above 0 and equal to the replicas' own, read just before or after it."""
            before, recorded, after = replicas.saturation(), prometheus.scalar(SATURATION), replicas.saturation()
            seen.append((before, recorded, after))
            return recorded if recorded and recorded in (before, after) else 0.0

        what = "Prometheus' saturation under load to equal the replicas' own: (direct, rule, direct)"
        assert eventually(agreed, 30, what, seen) <= 1.0

        # Every dashboard query runs; those on what the load drives (throughput, latency, batching, queue) get data
        # once calls were answered and scraped.
        driven = {"embedpool_tokens_total", "embedpool_rpc_duration_seconds_bucket", "embedpool_batch_inputs_sum"}
        driven |= {"embedpool_batch_padding_efficiency_sum", "embedpool_queue_inputs", SATURATION}
        gaps: list[list[str]] = []

        def dashboard_has_data() -> bool:
            results = {query: prometheus.api("query", query=filled(query))["result"] for query in dashboard_queries()}
            gaps.append([query for query, found in results.items() if not found and referenced_names(query) & driven])
            return not gaps[-1]

        eventually(dashboard_has_data, 30, "data for the dashboard's queries on what the load drives", gaps)
        assert load.failures == [], load.failures[:5]
    finally:
        load.stop()
    eventually(lambda: prometheus.scalar(SATURATION) == 0.0, 20, "the saturation to drop to 0 after the load")
    assert replicas.saturation() == 0.0


def test_prometheus_sees_the_database_down_and_a_killed_replica(replicas: Replicas, prometheus: Prometheus) -> None:
    """Last in the module: it stops the database for a while and kills a replica for good."""
    eventually(lambda: prometheus.scalar("count(embedpool_ready == 1)") == 2, 20, "2 replicas ready")

    replicas.postgres.stop()
    eventually(lambda: prometheus.scalar(f'max by (job) (embedpool_ready{{job="{JOB}"}})') == 0, 20, "none ready")
    alert = eventually(lambda: prometheus.alerts("EmbedpoolDatabaseDown"), 20, "EmbedpoolDatabaseDown pending")
    assert [(a["state"], a["labels"]["job"]) for a in alert] == [("pending", JOB)]
    replicas.postgres.start()
    eventually(lambda: prometheus.scalar("count(embedpool_ready == 1)") == 2, 30, "both ready again")

    killed = replicas.metrics_targets[1]
    replicas.fleet.replica(1).kill()
    eventually(lambda: prometheus.query(f'up{{job="{JOB}"}} == 0').keys() == {killed}, 20, "the killed one down")
    down = eventually(lambda: prometheus.alerts("EmbedpoolReplicaDown"), 20, "EmbedpoolReplicaDown pending")
    assert [(a["state"], a["labels"]["instance"]) for a in down] == [("pending", killed)]
    assert prometheus.scalar("count(embedpool_ready == 1)") == 1
