"""The model card: one content, written as Markdown and as one self-contained HTML page with the task's pictures;
every value from the data or the params escaped in the page."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines import modelcard
from pipelines.config import Paths
from pipelines.stages.evaluate import plots

HOSTILE = "<script>alert(1)</script>"
CLASSES = {"binary": ["no", "<b>Yes</b>"], "multiclass": ["low", "mid", "<i>high</i>"], "regression": None}


def _outputs(task: str, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Labels or values and a model's output on them, as the evaluate stage gets them."""
    rng = np.random.default_rng(0)
    if task == "regression":
        y = rng.normal(size=n)
        return y, y + rng.normal(scale=0.5, size=n)
    k = len(CLASSES[task] or [])
    y = rng.integers(0, k, n)
    output = rng.dirichlet(np.ones(k), n)
    output[np.arange(n), y] += 0.5
    return y, output / output.sum(axis=1, keepdims=True)


def _plots(task: str, root: Path) -> dict[str, Any]:
    """The evaluate stage's plot files of `task`, written and read back as promote reads them."""
    paths = Paths(root)
    paths.plots.mkdir(parents=True)
    for name, frame in plots(task, *_outputs(task), 0.5, 10, CLASSES[task]).items():
        frame.to_csv(getattr(paths, name), index=False, float_format="%.6g")
    return modelcard.read_plots(paths)


def _card(task: str, plot_data: dict[str, Any] | None = None) -> list[modelcard.Block]:
    metric = {"binary": "roc_auc", "multiclass": "f1_macro", "regression": "r2"}[task]
    metadata = {"version": "v2", "task": task, "classes": CLASSES[task], "threshold": 0.5, "ensemble": "blending",
                "weights": {"lightgbm": 0.7, "mlp": 0.3}, "device": "cpu", "data_md5": "abc", "train_rows": 200,
                "valid_rows": 50, "git_commit": "deadbeef", "seed": 1, "params": {"train": {"folds": 5}},
                "reports": {"metrics": "reports/metrics.json"}}
    metrics = {metric: 0.8123, "test_rows": 300, f"{metric}_lightgbm": 0.8011}
    slices = {HOSTILE: {HOSTILE: {"rows": 7, metric: 0.5}, "north": {"rows": 9, metric: None}}}
    decision = {"metric": metric, "champion_before": "v1", "champion_after": "v2", "promoted": True,
                "reason": f"gain +0.0300 {metric} (p=0.010) passes the gate", "gain": 0.03, "ci_low": 0.01,
                "ci_high": 0.05, "p_value": 0.01, "min_improvement": 0.001, "max_p_value": 0.05}
    return modelcard.card(metadata, metrics, slices, {"rows_in": 300}, {}, decision, "<target & co>",
                          plots=plot_data)


def _svg_labels(page: str) -> list[str]:
    return re.findall(r'<svg [^>]*aria-label="([^"]*)"', page)


def test_binary_card_page_has_metrics_curves_decision_and_escapes_every_value(tmp_path):
    page = modelcard.html(_card("binary", _plots("binary", tmp_path)))
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<td>roc_auc</td><td>0.8123</td>" in page and "<td>roc_auc_lightgbm</td><td>0.8011</td>" in page
    assert _svg_labels(page) == ["ROC curve", "Calibration"]
    roc = page[page.index('aria-label="ROC curve"'):page.index("</svg>", page.index('aria-label="ROC curve"'))]
    assert roc.count("<polyline") == 1 and "stroke-dasharray" in roc  # the curve and the random-guess diagonal
    calibration = page[page.index('aria-label="Calibration"'):]
    assert "<circle" in calibration and "rows: predicted" in calibration  # a dot per bin, its rows as a tooltip
    assert "<h2>Promotion decision</h2>" in page and "gain +0.0300 over champion v1" in page
    assert 'class="status champion"' in page
    # a category value, a column name, a class label and the target's name are the user's: escaped, never markup
    assert "<script" not in page and page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2
    assert "<h3>By &lt;script&gt;alert(1)&lt;/script&gt;</h3>" in page
    assert "<th>&lt;b&gt;Yes&lt;/b&gt;</th>" in page and "<b>" not in page  # the confusion matrix's class
    assert "<code>&lt;target &amp; co&gt;</code>" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing to fetch


@pytest.mark.parametrize(("task", "charts", "confusion"), [("multiclass", [], True),
                                                          ("regression", ["Residuals"], False)])
def test_each_task_gets_its_own_pictures(task, charts, confusion, tmp_path):
    page = modelcard.html(_card(task, _plots(task, tmp_path)))
    assert _svg_labels(page) == charts
    assert ("<h3>Confusion matrix</h3>" in page) is confusion
    if confusion:  # counts per actual (row) and predicted (column) class; they add up to the test rows
        table = page[page.index("<h3>Confusion matrix</h3>"):]
        table = table[:table.index("</table>")]
        assert "<th>&lt;i&gt;high&lt;/i&gt;</th>" in table
        assert sum(int(n) for n in re.findall(r"<td>(\d+)</td>", table)) == 300
    else:
        residuals = page[page.index('aria-label="Residuals"'):]
        assert residuals[:residuals.index("</svg>")].count("<circle") == 300


def test_without_plot_data_the_card_says_how_to_get_it():
    blocks = _card("binary")
    assert "<svg" not in modelcard.html(blocks)
    assert "No plot data in `reports/plots/`: run `amaas evaluate` before `amaas promote`" in modelcard.markdown(blocks)


def test_markdown_and_page_come_from_the_same_blocks(tmp_path):
    blocks = _card("binary", _plots("binary", tmp_path))
    text, page = modelcard.markdown(blocks), modelcard.html(blocks)
    headings = [b for b in blocks if isinstance(b, modelcard.Heading)]
    assert len(headings) > 10
    for heading in headings:
        assert f"{'#' * heading.level} {heading.text}\n" in text
        assert f"<h{heading.level}>{modelcard._esc(heading.text)}</h{heading.level}>" in page
    assert "**Status after its latest gate:** champion" in text and "| value | rows | roc_auc |" in text
    assert f"| {HOSTILE} | 7 | 0.5000 |" in text
    for chart in (b for b in blocks if isinstance(b, modelcard.Chart)):  # in Markdown the caption stands in
        assert modelcard._md_text(chart.caption) in text


def test_many_points_are_thinned_to_a_page_that_stays_small():
    import pandas as pd

    x = pd.Series(np.linspace(0, 1, 50_001))
    points = modelcard._points(x, x ** 2)
    assert len(points) == modelcard.MAX_POINTS and points[0] == (0.0, 0.0) and points[-1] == (1.0, 1.0)
    assert modelcard._points(pd.Series([0.0, np.nan, 1.0]), pd.Series([0.0, 1.0, np.inf])) == ((0.0, 0.0),)


def test_the_card_shows_which_columns_matter_as_bars_and_per_class(tmp_path):
    explain = {"version": "v2", "rows": 300, "method": "blending of lightgbm (tree SHAP)", "output": "probability",
               "mean_abs_contribution": {"age": 0.02, HOSTILE: 0.11, "region": 0.0},
               "per_class": {"low": {"age": 0.01, HOSTILE: 0.05, "region": 0.0},
                             "<i>high</i>": {"age": 0.01, HOSTILE: 0.06, "region": 0.0}}}
    page, text = (render(modelcard._importance(explain)) for render in (modelcard.html, modelcard.markdown))
    assert "<h2>Which columns matter</h2>" in page and _svg_labels(page) == ["Mean |contribution| per column"]
    bars = page[page.index('aria-label="Mean |contribution| per column"'):]
    bars = bars[:bars.index("</svg>")]
    widths = [float(w) for w in re.findall(r'<rect [^>]*width="([\d.]+)"', bars)]
    assert len(widths) == 3 and widths[0] > widths[1] > widths[2] == 0  # longest first, to scale from 0
    assert bars.index("&lt;script&gt;") < bars.index(">age<") and "<script" not in page
    assert "<th>&lt;i&gt;high&lt;/i&gt;</th>" in page  # the per-class table
    assert f"| {HOSTILE} | 0.1100 |" in text and "| region | 0.0000 | 0.0000 |" in text
    assert "<h2>Which columns matter</h2>" in modelcard.html(_card("binary"))  # a section of every card
    empty = modelcard.markdown(modelcard._importance({}))
    assert "No `reports/explain.json`: run `amaas evaluate` before `amaas promote`." in empty
