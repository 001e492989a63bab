"""deploy/grafana/embedpool.json: a dashboard Grafana 10+ imports (the data source a variable, unique panel ids,
every panel placed and querying), whose queries are valid PromQL (promtool checks them as rules, Grafana's
variables filled in) naming only metrics embedpool defines and recording rules rules.yml records."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest

import embedpool.metrics  # noqa: F401 - registers the metrics whose exposition the names are checked against

from .test_prometheus import (
    DASHBOARD,
    RULES,
    dashboard_queries,
    exposed_names,
    filled,
    promtool,
    referenced_names,
    rule_groups,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' collapsed children included."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def test_structure_is_importable(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36  # Grafana 9.x and later; 39 is Grafana 10.4's
    assert dashboard["uid"] == "embedpool"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "tenant"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE

    panels = _panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        pos = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= pos.keys(), panel["title"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        targets = panel["targets"]
        assert targets, f"{panel['title']} has no query"
        assert all(t["expr"].strip() and t["datasource"] == DATASOURCE for t in targets), panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
    # Panels do not overlap: no grid cell is claimed twice.
    cells = [(x, y) for p in panels for x, y in _cells(p["gridPos"])]
    assert len(cells) == len(set(cells)), "panels overlap"


def _cells(pos: dict[str, int]) -> list[tuple[int, int]]:
    return [(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])]


def test_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule's expression, with Grafana's variables filled in."""
    rules = [{"record": f"dashboard:query:{i}", "expr": filled(query)} for i, query in enumerate(dashboard_queries())]
    path = tmp_path / "queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_queries_name_only_metrics_embedpool_defines_or_rules_record() -> None:
    exposed = exposed_names(generate_latest(REGISTRY).decode())
    recorded = {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}
    referenced = set().union(*(referenced_names(query) for query in dashboard_queries()))
    assert referenced - exposed - recorded == set(), f"names neither in embedpool.metrics nor recorded by {RULES}"
    # The panels: throughput, tokens/s, latency per RPC, queue depth, batch fill, padding efficiency, store
    # write time, per-tenant usage; and the autoscaler's saturation.
    wanted = {
        "embedpool_rpc_duration_seconds_count",
        "embedpool_tokens_total",
        "embedpool_rpc_duration_seconds_bucket",
        "embedpool_queue_inputs",
        "embedpool_batch_inputs_sum",
        "embedpool_batch_padding_efficiency_sum",
        "embedpool_store_write_duration_seconds_bucket",
        "embedpool:saturation:ratio",
    } | {
        # A counter's _created series shows once a label was used in this process (an earlier test's server did):
        # a timestamp, nothing a panel plots.
        name
        for name in exposed
        if name.startswith("embedpool_tenant_") and not name.endswith("_created")
    }
    assert wanted - referenced == set(), "panels the dashboard lacks"


def test_raw_queries_follow_the_job_and_replica_variables() -> None:
    """Every embedpool_* selector is narrowed to the chosen job and replicas (recording rules are per job)."""
    for query in dashboard_queries():
        for selector in re.findall(r"(?<![\w:])embedpool_[a-z0-9_]+(?:\{[^}]*\})?", query):
            assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, f"{selector} in {query}"
