"""The Grafana dashboard of infra/: its panels' PromQL queries and the metric names they read, and the metric
names a Prometheus /metrics text exposes (shared by the unit test and the test against a real `amaas serve`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.conftest import REPO

DASHBOARD = REPO / "infra" / "grafana" / "dashboards" / "amaas-serving.json"
# PromQL words that are not metric names: aggregation modifiers, set and vector-matching operators
KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                      "offset", "atan2", "inf", "nan"})
IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, as written (a histogram's `_bucket` included)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations, $__rate_interval
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\boffset\s+\S+", " ", text)
    names = set()
    for match in IDENTIFIER.finditer(text):
        name, rest = match.group(), text[match.end():].lstrip()
        preceded = text[:match.start()]
        if rest.startswith("(") or name.lower() in KEYWORDS or preceded.endswith("$"):
            continue  # a function call, a keyword, a Grafana variable
        if re.search(r"[0-9.]$", preceded) and re.fullmatch(r"e\d*|[a-z]", name):
            continue  # the exponent of a number like 1e-9
        names.add(name)
    return names


def exposed_names(metrics_text: str) -> set[str]:
    """The sample names in a Prometheus text exposition (`x_bucket`, `x_sum`, `x_count` for a histogram x)."""
    names = set()
    for line in metrics_text.splitlines():
        if line and not line.startswith("#"):
            match = IDENTIFIER.match(line)
            if match:
                names.add(match.group())
    return names
