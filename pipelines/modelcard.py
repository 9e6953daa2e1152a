"""A model card per registered version: what the model is, what it was trained and tested on, how it does
overall and per slice, where it came from, and what the promotion gate decided.

The content is built once, as a list of blocks (headings, paragraphs, bullets, tables, charts: `card`), and
written two ways from it: Markdown (`markdown`) and one self-contained HTML page (`html`: inline CSS, the charts
as inline SVG drawn here from the evaluate stage's plot data, no script, nothing fetched). Every value that comes
from the data or the params (column names, category values, labels) is escaped in the HTML.
"""

from __future__ import annotations

import html as html_lib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from pipelines.config import Paths
from pipelines.metrics import REPORTED

EXTRA_ROWS = ("brier", "calibration_error")
WHAT = {"binary": ("the probability of each class of ", " (two classes: {c}; label cut-off {cut})"),
        "multiclass": ("the probability of each class of ", " ({c}); the label is the most probable class"),
        "regression": ("the value of ", "")}  # what the model predicts: the text before and after the target's name
PLOTS = ("roc_plot", "calibration_plot", "confusion_plot", "residuals_plot")  # the card's pictures, by Paths property
MAX_POINTS = 2000  # points drawn per chart: a test set of 100k rows would make a page of megabytes


# ---- the blocks a card is made of -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Code:
    """Inline code: `text`."""

    text: str


@dataclass(frozen=True)
class Strong:
    """Inline emphasis: **text**."""

    text: str


Span = str | Code | Strong
Text = tuple[Span, ...]


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: Text
    css: str = ""  # a class for the HTML page (the status line); Markdown has none


@dataclass(frozen=True)
class Bullets:
    items: tuple[Text, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Chart:
    """A picture of plot data: drawn as SVG in the HTML page; in Markdown its caption stands in for it."""

    title: str
    x_label: str
    y_label: str
    points: tuple[tuple[float, float], ...]
    caption: Text
    mark: Literal["line", "dots", "line+dots"] = "line"
    reference: Literal["diagonal", "zero", None] = None  # a random guess / perfect calibration; no residual
    unit_square: bool = False  # both axes 0 to 1 (rates, probabilities)
    notes: tuple[str, ...] = ()  # a tooltip per point (dots only)


@dataclass(frozen=True)
class Bars:
    """Horizontal bars, one per label, longest first: drawn as SVG in the HTML page, a table in Markdown."""

    title: str
    value_label: str
    bars: tuple[tuple[str, float], ...]
    caption: Text


Block = Heading | Para | Bullets | Table | Chart | Bars


def _text(*spans: Any) -> Text:
    return tuple(s if isinstance(s, Code | Strong) else str(s) for s in spans)


# ---- the content ------------------------------------------------------------------------------------------------
def card(metadata: dict[str, Any], metrics: dict[str, Any], slices: dict[str, Any], validation: dict[str, Any],
         drift: dict[str, Any], decision: dict[str, Any], target: str, compression: dict[str, Any] | None = None,
         cost: dict[str, Any] | None = None, plots: dict[str, pd.DataFrame] | None = None,
         explain: dict[str, Any] | None = None) -> list[Block]:
    """The card's content, from the bundle metadata, the reports of the run that produced it, the evaluate
    stage's plot data (`read_plots`) and its global explanation (reports/explain.json)."""
    version = metadata["version"]
    status = "champion" if decision.get("champion_after") == version else "not promoted"
    reason = decision.get("reason", "no decision recorded")
    return [Heading(1, f"Model card: {version}"),
            Para(_text(Strong("Status after its latest gate:"), f" {status} ({reason})."),
                 css=f"status {status.replace(' ', '-')}"),
            *_model(metadata, target), *_data(metadata, metrics, validation, drift),
            *_metrics(metadata, metrics, decision), *_slices(slices), *_plots(metadata, metrics, plots or {}),
            *_importance(explain or {}), *_compression(compression or {}, metadata),
            *_cost(cost or {}, decision.get("serving") or {}),
            *_lineage(metadata), *_decision(decision), *_limits()]


def _model(metadata: dict[str, Any], target: str) -> list[Block]:
    task = metadata.get("task", "binary")
    before, after = WHAT[task]
    after = after.format(c=", ".join(map(str, metadata.get("classes") or [])), cut=_num(metadata.get("threshold", 0.5)))
    choice = metadata.get("threshold_choice", {})
    chosen = (f" Cut-off chosen by {choice['criterion']} on the validation rows."
              if choice.get("criterion") in ("f1", "expected_cost") else "")
    items = [_text("Predicts " + before, Code(target), after + " for one row of the input table." + chosen),
             _text("Ensemble: ", Strong(str(metadata["ensemble"])), " of "
                   + ", ".join(f"{name} (weight {w:.3f})" for name, w in metadata["weights"].items()) + "."),
             _text(f"Device: {metadata['device']}; trained on: {metadata.get('trained_on', 'this process')}.")]
    combination = metadata.get("combination") or {}
    if combination.get("served", "ensemble") != "ensemble":  # say why one member serves, not the configured blend
        valid = combination.get("valid", {})
        items.append(_text("Served alone: ", Strong(str(combination["served"])), f" scored {combination['metric']} "
                           f"{_num(valid.get(combination['served']))} on the validation rows, better than the "
                           f"{metadata.get('params', {}).get('ensemble', 'configured')} blend of the members "
                           f"({_num(valid.get('ensemble'))}), so the blend is not served."))
    if metadata.get("class_weights"):
        items.append(_text("Labels: the class with the highest probability x class weight (weights "
                           + ", ".join(f"{c}: {w:.3g}" for c, w in zip(metadata.get("classes") or [],
                                                                     metadata["class_weights"], strict=False))
                           + f"), chosen on the validation rows for {choice.get('criterion')}."))
    if metadata.get("tuned_params"):
        items.append(_text("Tuned parameters: " + "; ".join(f"{k}: {v}" for k, v in metadata["tuned_params"].items())))
    return [Heading(2, "Model"), Bullets(tuple(items))]


def _data(metadata: dict[str, Any], metrics: dict[str, Any], validation: dict[str, Any], drift: dict[str, Any]
          ) -> list[Block]:
    return [Heading(2, "Data"), Bullets((
        _text("Data version (md5 of ", Code("data/validated/data.parquet"), ", DVC's hash of it): ",
              Code(str(metadata["data_md5"])), "."),
        _text(f"Rows: {metadata['train_rows']} train, {metadata['valid_rows']} validation (early stopping, ensemble "
              f"weights, tuning), {metrics.get('test_rows', '?')} held-out test "
              f"(prepare.split: by time, newest rows last, or random; every class in every split)."),
        _text(f"Validation: {validation.get('rows_in', '?')} rows in {validation.get('batches', '?')} batches, "
              f"{validation.get('rows_quarantined', '?')} quarantined ({validation.get('bad_share', 0):.2%})."),
        _text(f"Monitoring of {drift.get('current', '?')} against the champion's reference at training time: "
              f"{drift.get('n_drifted', '?')} of {drift.get('n_columns', '?')} feature columns drifted, prediction "
              f"drift {drift.get('prediction_drift', '?')} (retrain needed: {drift.get('retrain_needed', '?')})."),
    ))]


def _metrics(metadata: dict[str, Any], metrics: dict[str, Any], decision: dict[str, Any]) -> list[Block]:
    task = metadata.get("task", "binary")
    rows = [(m, _num(metrics.get(m))) for m in (*REPORTED[task], *EXTRA_ROWS) if m in metrics]
    rows += [(k, _num(v)) for k, v in sorted(metrics.items())
             if k.startswith(f"{decision.get('metric')}_") and not isinstance(v, dict)]
    blocks: list[Block] = [Heading(2, "Metrics on held-out test rows"), Table(("metric", "value"), tuple(rows))]
    if metrics.get("per_class"):
        blocks += [Heading(3, "Per class"), Table(
            ("class", "precision", "recall", "F1", "rows"),
            tuple((str(c), _num(s["precision"]), _num(s["recall"]), _num(s["f1"]), str(s["support"]))
                  for c, s in metrics["per_class"].items()))]
    return blocks


def _plots(metadata: dict[str, Any], metrics: dict[str, Any], plots: dict[str, pd.DataFrame]) -> list[Block]:
    """The pictures of the task: ROC and calibration curves (binary), the confusion matrix (classification),
    residuals (regression), from the evaluate stage's plot data of the trained ensemble."""
    task = metadata.get("task", "binary")
    wanted = {"binary": PLOTS[:3], "multiclass": PLOTS[2:3], "regression": PLOTS[3:]}[task]
    blocks: list[Block] = [Heading(2, "Plots on held-out test rows")]
    if not any(name in plots for name in wanted):
        return [*blocks, Para(_text("No plot data in ", Code("reports/plots/"), ": run ", Code("amaas evaluate"),
                                    " before ", Code("amaas promote"), " to draw them."))]
    of = f"the trained ensemble's {metrics.get('test_rows', '?')} held-out test rows"
    if (roc := plots.get("roc_plot")) is not None:
        blocks += [Heading(3, "ROC curve"), _roc(roc, metrics.get("roc_auc"), of)]
    if (calibration := plots.get("calibration_plot")) is not None:
        blocks += [Heading(3, "Calibration"), _calibration(calibration, of)]
    if (confusion := plots.get("confusion_plot")) is not None:
        blocks += [Heading(3, "Confusion matrix"), *_confusion(confusion, metadata, of)]
    if (residuals := plots.get("residuals_plot")) is not None:
        blocks += [Heading(3, "Residuals"), _residuals(residuals, of)]
    return blocks


def _importance(explain: dict[str, Any]) -> list[Block]:
    """Which input columns move the answers most: mean |contribution| per column on test rows (reports/explain.json),
    per class for classification."""
    blocks: list[Block] = [Heading(2, "Which columns matter")]
    overall = explain.get("mean_abs_contribution")
    if not overall:
        return [*blocks, Para(_text("No ", Code("reports/explain.json"), ": run ", Code("amaas evaluate"), " before ",
                                    Code("amaas promote"), "."))]
    space = "each class's probability" if explain.get("output") == "probability" else "the predicted value"
    ranked = sorted(overall.items(), key=lambda item: -item[1])
    blocks.append(Bars("Mean |contribution| per column", f"mean |contribution| to {space}",
                       tuple((str(c), float(v)) for c, v in ranked),
                       _text(f"How far each input column moves {space} on average (summed over the classes), over "
                             f"{explain.get('rows', '?')} held-out test rows of the trained ensemble "
                             f"{explain.get('version', '')} ({explain.get('method', '')}). Per row, the base value "
                             f"plus every column's contribution is the answer: ", Code("POST /explain"),
                             " gives them.")))
    per_class = explain.get("per_class")
    if per_class:
        names = list(per_class)
        blocks += [Para(_text("Per class: the mean |contribution| to that class's probability.")),
                   Table(("column", *names), tuple((str(c), *(f"{per_class[n][c]:.4f}" for n in names))
                                                   for c, _ in ranked))]
    return blocks


def _roc(frame: pd.DataFrame, auc: Any, of: str) -> Block:
    if frame.empty:
        return Para(_text("No ROC curve: the test rows hold one class only."))
    return Chart("ROC curve", "false positive rate", "true positive rate", _points(frame["fpr"], frame["tpr"]),
                 _text(f"True against false positive rate on {of} as the cut-off moves (ROC AUC {_num(auc)}); the "
                       f"diagonal is a random guess."), reference="diagonal", unit_square=True)


def _calibration(frame: pd.DataFrame, of: str) -> Block:
    return Chart("Calibration", "mean predicted probability", "observed share of positives",
                 _points(frame["mean_predicted"], frame["fraction_positive"]),
                 _text(f"Per probability bin ({len(frame)} with rows), the observed share of positives against the "
                       f"mean predicted probability, on {of}; on the diagonal the probabilities are calibrated."),
                 mark="line+dots", reference="diagonal", unit_square=True,
                 notes=tuple(f"{int(r)} rows: predicted {p:.3f}, observed {o:.3f}" for r, p, o in
                             frame[["rows", "mean_predicted", "fraction_positive"]].itertuples(index=False)))


def _confusion(frame: pd.DataFrame, metadata: dict[str, Any], of: str) -> list[Block]:
    known = [str(c) for c in metadata.get("classes") or []]
    seen = sorted({*frame["actual"].astype(str), *frame["predicted"].astype(str)} - set(known))
    labels = [*known, *seen]
    counts = pd.crosstab(frame["actual"].astype(str), frame["predicted"].astype(str)).reindex(
        index=labels, columns=labels, fill_value=0)
    return [Para(_text(f"Row counts of {of} by actual class (table rows) and predicted class (columns).")),
            Table(("actual \\ predicted", *labels),
                  tuple((label, *(str(int(n)) for n in counts.loc[label])) for label in labels))]


def _residuals(frame: pd.DataFrame, of: str) -> Block:
    shown = min(len(frame), MAX_POINTS)
    residual = frame["residual"].to_numpy(dtype="float64")
    return Chart("Residuals", "predicted value", "residual (actual - predicted)",
                 _points(frame["predicted"], frame["residual"]),
                 _text(f"Residual against prediction on {of} ({shown} of {len(frame)} rows drawn); mean residual "
                       f"{_num(float(np.nanmean(residual)) if len(residual) else None)}, 0 is no error."),
                 mark="dots", reference="zero")


def _points(x: pd.Series, y: pd.Series) -> tuple[tuple[float, float], ...]:
    """Finite (x, y) pairs in order, at most MAX_POINTS of them, evenly spread (the first and last kept)."""
    xy = np.column_stack([x.to_numpy(dtype="float64"), y.to_numpy(dtype="float64")])
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) > MAX_POINTS:
        xy = xy[np.unique(np.linspace(0, len(xy) - 1, MAX_POINTS).round().astype(int))]
    return tuple((float(a), float(b)) for a, b in xy)


def _slices(slices: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = []
    for column, values in slices.items():
        fields = [k for k in next(iter(values.values()), {}) if k != "rows"]
        blocks += [Heading(3, f"By {column}"), Table(
            ("value", "rows", *fields),
            tuple((str(value), str(s["rows"]), *(_num(s[f]) for f in fields)) for value, s in values.items()))]
    return blocks


def _compression(compression: dict[str, Any], metadata: dict[str, Any]) -> list[Block]:
    """What serves (the ensemble, its distilled student or its int8 copy) and every candidate's figures."""
    if not compression.get("candidates"):
        return []
    metric, served = compression["metric"], compression["served"]
    made = f"; this model was made from it as its {served}." if metadata.get("compressed_from") else "."
    return [Heading(2, "Compression"),
            Para(_text("Serves: ", Strong(str(served)), f" ({compression['reason']}). The metrics above are of the "
                       f"trained ensemble ", Code(str(compression.get("trained_version"))), made)),
            Table(("candidate", metric, "1-row p50 ms", "1-row p99 ms", "1-row CPU ms", "rows/s (batch 256)", "size",
                   "peak memory", "$ per 1,000 rows"),
                  tuple((name, _num(f.get(metric)), f"{f['latency_ms_p50']:.3f}", f"{f['latency_ms_p99']:.3f}",
                         _ms(f.get("cpu_ms_p50")), f"{f['rows_per_s']:,.0f}", _mib(f["disk_bytes"]),
                         _mib(f.get("peak_memory_bytes")), f"{f['usd_per_1k_rows']:.2e}")
                        for name, f in compression["candidates"].items()))]


def _cost(cost: dict[str, Any], serving: dict[str, Any]) -> list[Block]:
    if not cost.get("stages"):
        return []
    stages = ", ".join(f"{name} ${s['usd']:.5f}" for name, s in cost["stages"].items())
    items = [_text(f"Training run (the latest run of each stage, {cost['total']['cpu_s']:.1f} CPU s, "
                   f"{cost['total']['gpu_s']:.1f} GPU s): ", Strong(f"${cost['total']['usd']:.5f}"), f" ({stages})."),
             _text(f"Prices: ${cost['prices']['cpu_hour_usd']} per CPU-hour, ${cost['prices']['gpu_hour_usd']} per "
                   f"GPU-hour ({cost['prices']['source']}).")]
    if serving.get("usd_per_1k_rows") is not None:
        items.append(_text(f"Serving: ${serving['usd_per_1k_rows']:.2e} per 1,000 predictions (CPU time per row at "
                           f"batches of 256, in process, on the machine that ran compress)."))
    return [Heading(2, "Cost"), Bullets(tuple(items))]


def _lineage(metadata: dict[str, Any]) -> list[Block]:
    reports: list[Span] = ["Reports of the run: "]
    for path in metadata.get("reports", {}).values():
        reports += [", ", Code(str(path))] if len(reports) > 1 else [Code(str(path))]
    return [Heading(2, "Lineage"), Bullets((
        _text("Code: git commit ", Code(str(metadata.get("git_commit"))), f"; seed {metadata.get('seed')}."),
        _text(f"Training parameters: {metadata.get('params')}"),
        tuple(reports)))]


def _decision(decision: dict[str, Any]) -> list[Block]:
    items: list[Text] = []
    if decision.get("gain") is not None:
        items.append(_text(f"Gate on {decision['metric']}: gain {decision['gain']:+.4f} over champion "
                           f"{decision['champion_before']} (95% bootstrap CI {decision['ci_low']:+.4f} to "
                           f"{decision['ci_high']:+.4f}, p={decision['p_value']:.3f}); needs >= "
                           f"{decision['min_improvement']} and p <= {decision['max_p_value']}."))
    items.append(_text(f"Promoted: {decision.get('promoted')}; champion after: {decision.get('champion_after')}."))
    return [Heading(2, "Promotion decision"), Bullets(tuple(items))]


def _limits() -> list[Block]:
    return [Heading(2, "Limits"), Bullets((
        _text("Valid for data like the training rows: the drift report and the monitoring say when that stops."),
        _text("Slices with few rows have wide error bars; a metric missing there had one class only.")))]


def _mib(value: Any) -> str:
    return "n/a" if value is None else f"{value / 2**20:.2f} MiB"


def _ms(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"  # a report from before compress kept the CPU time: n/a


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def read_plots(paths: Paths) -> dict[str, pd.DataFrame]:
    """The evaluate stage's plot data the card draws (reports/plots/*.csv), by `Paths` property; those the task
    has no file for are left out. Labels stay text."""
    return {name: pd.read_csv(file, dtype={"actual": str, "predicted": str} if name == "confusion_plot" else None,
                              keep_default_na=name != "confusion_plot")
            for name in PLOTS if (file := getattr(paths, name)).is_file()}


# ---- Markdown ---------------------------------------------------------------------------------------------------
def markdown(blocks: Iterable[Block]) -> str:
    """The card as Markdown."""
    return "\n\n".join(_md_block(b) for b in blocks) + "\n"


def _md_block(block: Block) -> str:
    if isinstance(block, Heading):
        return "#" * block.level + " " + block.text
    if isinstance(block, Para):
        return _md_text(block.text)
    if isinstance(block, Bullets):
        return "\n".join("- " + _md_text(item) for item in block.items)
    if isinstance(block, Table):
        def row(cells: Iterable[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

        return "\n".join([row(block.header), "|" + " --- |" * len(block.header), *map(row, block.rows)])
    if isinstance(block, Bars):
        return "\n\n".join([_md_text(block.caption), _md_block(Table(("column", block.value_label), tuple(
            (label.replace("|", "\\|"), f"{value:.4f}") for label, value in block.bars)))])
    return _md_text((*block.caption, " (Drawn in the HTML card.)"))


def _md_text(text: Text) -> str:
    return "".join(f"`{s.text}`" if isinstance(s, Code) else f"**{s.text}**" if isinstance(s, Strong) else s
                   for s in text)


# ---- HTML -------------------------------------------------------------------------------------------------------
CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; margin: 0;
       background: #f6f8fa; }
main { max-width: 64rem; margin: 0 auto; padding: 1.5rem 2rem 3rem; background: #fff; }
h1 { font-size: 1.7rem; margin-top: 0; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2rem; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, monospace; background: #eff1f3; padding: .1rem .3rem;
       border-radius: 4px; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; } th { background: #f6f8fa; text-align: left; }
td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
.status { padding: .6rem .9rem; border-radius: 6px; border-left: 6px solid; }
.status.champion { background: #dafbe1; border-color: #1a7f37; }
.status.not-promoted { background: #fff8c5; border-color: #9a6700; }
figure { margin: .5rem 0 1rem; } figcaption { color: #59636e; font-size: 13px; max-width: 40rem; }
svg text { font: 11px system-ui, sans-serif; fill: #59636e; }
"""
# the page runs nothing and fetches nothing: a value that slipped through unescaped still could not act
POLICY = "default-src 'none'; style-src 'unsafe-inline'"


def html(blocks: Iterable[Block]) -> str:
    """The card as one self-contained HTML page: inline CSS, inline SVG charts, no script, nothing fetched."""
    blocks = list(blocks)
    title = next((b.text for b in blocks if isinstance(b, Heading)), "Model card")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>", "<main>",
        *(_html_block(b) for b in blocks), "</main>", "</body>", "</html>", ""])


def _esc(value: Any) -> str:
    return html_lib.escape(str(value), quote=True)


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{_esc(block.text)}</h{block.level}>"
    if isinstance(block, Para):
        css = f' class="{_esc(block.css)}"' if block.css else ""
        return f"<p{css}>{_html_text(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>\n" + "\n".join(f"<li>{_html_text(item)}</li>" for item in block.items) + "\n</ul>"
    if isinstance(block, Table):
        head = "".join(f"<th>{_esc(c)}</th>" for c in block.header)
        body = "\n".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
        return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"
    if isinstance(block, Bars):
        return f"<figure>\n{bars_svg(block)}\n<figcaption>{_html_text(block.caption)}</figcaption>\n</figure>"
    return f"<figure>\n{svg(block)}\n<figcaption>{_html_text(block.caption)}</figcaption>\n</figure>"


def _html_text(text: Text) -> str:
    return "".join(f"<code>{_esc(s.text)}</code>" if isinstance(s, Code) else
                   f"<strong>{_esc(s.text)}</strong>" if isinstance(s, Strong) else _esc(s) for s in text)


WIDTH, HEIGHT = 420, 320
LEFT, RIGHT, TOP, BOTTOM = 56, 14, 12, 44


def svg(chart: Chart) -> str:
    """The chart as an inline SVG element: axes with ticks, the reference line, the points."""
    xs = [p[0] for p in chart.points]
    ys = [p[1] for p in chart.points]
    x0, x1 = (0.0, 1.0) if chart.unit_square else _domain(xs)
    y0, y1 = (0.0, 1.0) if chart.unit_square else _domain([*ys, *([0.0] if chart.reference == "zero" else [])])
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * inner_w

    def sy(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * inner_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
           f'height="{HEIGHT}" role="img" aria-label="{_esc(chart.title)}">',
           f'<rect x="{LEFT}" y="{TOP}" width="{inner_w}" height="{inner_h}" fill="#fff" stroke="#8c959f"/>']
    for tick, label in _ticks(x0, x1):
        out.append(f'<line x1="{sx(tick):.1f}" y1="{TOP + inner_h}" x2="{sx(tick):.1f}" y2="{TOP + inner_h + 4}" '
                   f'stroke="#8c959f"/><text x="{sx(tick):.1f}" y="{TOP + inner_h + 16}" '
                   f'text-anchor="middle">{label}</text>')
    for tick, label in _ticks(y0, y1):
        out.append(f'<line x1="{LEFT - 4}" y1="{sy(tick):.1f}" x2="{LEFT}" y2="{sy(tick):.1f}" stroke="#8c959f"/>'
                   f'<text x="{LEFT - 7}" y="{sy(tick) + 4:.1f}" text-anchor="end">{label}</text>')
    out.append(f'<text x="{LEFT + inner_w / 2:.1f}" y="{HEIGHT - 8}" text-anchor="middle">{_esc(chart.x_label)}'
               f'</text><text transform="translate(14 {TOP + inner_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
               f'{_esc(chart.y_label)}</text>')
    if chart.reference == "diagonal":
        out.append(f'<line x1="{sx(x0):.1f}" y1="{sy(y0):.1f}" x2="{sx(x1):.1f}" y2="{sy(y1):.1f}" stroke="#8c959f" '
                   f'stroke-dasharray="4 4"/>')
    elif chart.reference == "zero":
        out.append(f'<line x1="{LEFT}" y1="{sy(0.0):.1f}" x2="{LEFT + inner_w}" y2="{sy(0.0):.1f}" stroke="#8c959f" '
                   f'stroke-dasharray="4 4"/>')
    if "line" in chart.mark and chart.points:
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in chart.points)
        out.append(f'<polyline points="{line}" fill="none" stroke="#0969da" stroke-width="2"/>')
    if "dots" in chart.mark:
        radius, opacity = (3.5, 1.0) if chart.mark == "line+dots" else (2.0, 0.5)
        for i, (x, y) in enumerate(chart.points):
            note = f"<title>{_esc(chart.notes[i])}</title>" if i < len(chart.notes) else ""
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{radius}" fill="#0969da" '
                       f'fill-opacity="{opacity}">{note}</circle>')
    out.append("</svg>")
    return "\n".join(out)


BAR_HEIGHT, LABEL_WIDTH = 18, 160


def bars_svg(chart: Bars) -> str:
    """Horizontal bars as an inline SVG element: a label and a value per bar, lengths to scale from 0."""
    top = max((v for _, v in chart.bars), default=0.0) or 1.0
    inner = WIDTH - LABEL_WIDTH - 70
    height = BAR_HEIGHT * len(chart.bars) + 24
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
           f'height="{height}" role="img" aria-label="{_esc(chart.title)}">']
    for i, (label, value) in enumerate(chart.bars):
        y = i * BAR_HEIGHT
        length = max(0.0, value) / top * inner
        out.append(f'<text x="{LABEL_WIDTH - 6}" y="{y + 13}" text-anchor="end">{_esc(label)}</text>'
                   f'<rect x="{LABEL_WIDTH}" y="{y + 3}" width="{length:.1f}" height="{BAR_HEIGHT - 6}" '
                   f'fill="#0969da"/>'
                   f'<text x="{LABEL_WIDTH + length + 4:.1f}" y="{y + 13}">{value:.4g}</text>')
    out.append(f'<text x="{LABEL_WIDTH + inner / 2:.1f}" y="{height - 6}" text-anchor="middle">'
               f"{_esc(chart.value_label)}</text>")
    out.append("</svg>")
    return "\n".join(out)


def _domain(values: list[float]) -> tuple[float, float]:
    """An axis range that holds every value, with a little room; a single value gets a unit around it."""
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    pad = (high - low) * 0.05 or max(abs(low), 1.0) * 0.5
    return low - pad, high + pad


def _ticks(low: float, high: float, about: int = 5) -> list[tuple[float, str]]:
    """Round ticks inside [low, high], with their labels: steps of 1, 2 or 5 times a power of ten, about `about`."""
    raw = (high - low) / about
    power = 10.0 ** np.floor(np.log10(raw))
    step = power * next(m for m in (1, 2, 5, 10) if raw <= m * power)
    decimals = max(0, int(-np.floor(np.log10(step) + 1e-9)))
    first = np.ceil(low / step - 1e-9)
    values = [float(k * step) + 0.0 for k in np.arange(first, np.floor(high / step + 1e-9) + 1)]  # + 0.0: no -0
    return [(v, f"{v:.{decimals}f}") for v in values]
