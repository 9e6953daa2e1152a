"""A model card per registered version (Markdown): what the model is, what it was trained and tested on,
how it does overall and per slice, where it came from, and what the promotion gate decided."""

from __future__ import annotations

from typing import Any

from pipelines.metrics import REPORTED

EXTRA_ROWS = ("brier", "calibration_error")
WHAT = {"binary": "the probability of each class of `{t}` (two classes: {c}; label cut-off {cut})",
        "multiclass": "the probability of each class of `{t}` ({c}); the label is the most probable class",
        "regression": "the value of `{t}`"}


def render(metadata: dict[str, Any], metrics: dict[str, Any], slices: dict[str, Any], validation: dict[str, Any],
           drift: dict[str, Any], decision: dict[str, Any], target: str, compression: dict[str, Any] | None = None,
           cost: dict[str, Any] | None = None) -> str:
    """The card as Markdown, from the bundle metadata and the reports of the run that produced it."""
    version = metadata["version"]
    task = metadata.get("task", "binary")
    status = "champion" if decision.get("champion_after") == version else "not promoted"
    lines = [
        f"# Model card: {version}",
        "",
        f"**Status after its latest gate:** {status} ({decision.get('reason', 'no decision recorded')}).",
        "",
        "## Model",
        "- Predicts " + WHAT[task].format(t=target, c=", ".join(map(str, metadata.get("classes") or [])),
                                           cut=_num(metadata.get("threshold", 0.5)))
        + " for one row of the input table."
        + (f" Cut-off chosen by {choice['criterion']} on the validation rows." if (
            choice := metadata.get("threshold_choice", {})).get("criterion") in ("f1", "expected_cost") else ""),
        f"- Ensemble: **{metadata['ensemble']}** of "
        + ", ".join(f"{name} (weight {w:.3f})" for name, w in metadata["weights"].items()) + ".",
        f"- Device: {metadata['device']}; trained on: {metadata.get('trained_on', 'this process')}.",
    ]
    if metadata.get("tuned_params"):
        lines.append("- Tuned parameters: " + "; ".join(f"{k}: {v}" for k, v in metadata["tuned_params"].items()))
    lines += [
        "",
        "## Data",
        f"- Data version (md5 of `data/validated/data.parquet`, DVC's hash of it): `{metadata['data_md5']}`.",
        f"- Rows: {metadata['train_rows']} train, {metadata['valid_rows']} validation (early stopping, ensemble "
        f"weights, tuning), {metrics.get('test_rows', '?')} held-out test "
        f"(prepare.split: by time, newest rows last, or random; every class in every split).",
        f"- Validation: {validation.get('rows_in', '?')} rows in {validation.get('batches', '?')} batches, "
        f"{validation.get('rows_quarantined', '?')} quarantined ({validation.get('bad_share', 0):.2%}).",
        f"- Monitoring of {drift.get('current', '?')} against the champion's reference at training time: "
        f"{drift.get('n_drifted', '?')} of {drift.get('n_columns', '?')} feature columns drifted, prediction "
        f"drift {drift.get('prediction_drift', '?')} (retrain needed: {drift.get('retrain_needed', '?')}).",
        "",
        "## Metrics on held-out test rows",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {m} | {_num(metrics.get(m))} |" for m in (*REPORTED[task], *EXTRA_ROWS) if m in metrics),
        *(f"| {k} | {_num(v)} |" for k, v in sorted(metrics.items())
          if k.startswith(f"{decision.get('metric')}_") and not isinstance(v, dict)),
    ]
    if metrics.get("per_class"):
        lines += ["", "### Per class", "", "| class | precision | recall | F1 | rows |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {c} | {_num(s['precision'])} | {_num(s['recall'])} | {_num(s['f1'])} | {s['support']} |"
                  for c, s in metrics["per_class"].items()]
    for column, values in slices.items():
        fields = [k for k in next(iter(values.values()), {}) if k != "rows"]
        lines += ["", f"### By {column}", "", "| value | rows | " + " | ".join(fields) + " |",
                  "| --- | --- |" + " --- |" * len(fields)]
        lines += [f"| {value} | {s['rows']} | " + " | ".join(_num(s[f]) for f in fields) + " |"
                  for value, s in values.items()]
    lines += _compression_lines(compression or {}, metadata) + _cost_lines(cost or {}, decision.get("serving") or {})
    lines += [
        "",
        "## Lineage",
        f"- Code: git commit `{metadata.get('git_commit')}`; seed {metadata.get('seed')}.",
        f"- Training parameters: {metadata.get('params')}",
        "- Reports of the run: " + ", ".join(f"`{p}`" for p in metadata.get("reports", {}).values()),
        "",
        "## Promotion decision",
    ]
    if decision.get("gain") is not None:
        lines.append(f"- Gate on {decision['metric']}: gain {decision['gain']:+.4f} over champion "
                     f"{decision['champion_before']} (95% bootstrap CI {decision['ci_low']:+.4f} to "
                     f"{decision['ci_high']:+.4f}, p={decision['p_value']:.3f}); needs >= "
                     f"{decision['min_improvement']} and p <= {decision['max_p_value']}.")
    lines += [f"- Promoted: {decision.get('promoted')}; champion after: {decision.get('champion_after')}.",
              "",
              "## Limits",
              "- Valid for data like the training rows: the drift report and the monitoring say when that stops.",
              "- Slices with few rows have wide error bars; a metric missing there had one class only.",
              ""]
    return "\n".join(lines)


def _compression_lines(compression: dict[str, Any], metadata: dict[str, Any]) -> list[str]:
    """What serves (the ensemble, its distilled student or its int8 copy) and every candidate's figures."""
    if not compression.get("candidates"):
        return []
    metric = compression["metric"]
    served = compression["served"]
    lines = ["", "## Compression", "",
             f"Serves: **{served}** ({compression['reason']}). The metrics above are of the trained ensemble "
             f"`{compression.get('trained_version')}`" + (f"; this model was made from it as its {served}."
                                                          if metadata.get("compressed_from") else "."),
             "", f"| candidate | {metric} | 1-row p50 ms | 1-row p99 ms | rows/s (batch 256) | size | peak memory "
                 f"| $ per 1,000 rows |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, f in compression["candidates"].items():
        lines.append(f"| {name} | {_num(f.get(metric))} | {f['latency_ms_p50']:.3f} | {f['latency_ms_p99']:.3f} | "
                     f"{f['rows_per_s']:,.0f} | {_mib(f['disk_bytes'])} | {_mib(f.get('peak_memory_bytes'))} | "
                     f"{f['usd_per_1k_rows']:.2e} |")
    return lines


def _cost_lines(cost: dict[str, Any], serving: dict[str, Any]) -> list[str]:
    if not cost.get("stages"):
        return []
    stages = ", ".join(f"{name} ${s['usd']:.5f}" for name, s in cost["stages"].items())
    lines = ["", "## Cost", "",
             f"- Training run (the latest run of each stage, {cost['total']['cpu_s']:.1f} CPU s, "
             f"{cost['total']['gpu_s']:.1f} GPU s): **${cost['total']['usd']:.5f}** ({stages}).",
             f"- Prices: ${cost['prices']['cpu_hour_usd']} per CPU-hour, ${cost['prices']['gpu_hour_usd']} per "
             f"GPU-hour ({cost['prices']['source']})."]
    if serving.get("usd_per_1k_rows") is not None:
        lines.append(f"- Serving: ${serving['usd_per_1k_rows']:.2e} per 1,000 predictions (CPU time per row at "
                     f"batches of 256, in process, on the machine that ran compress).")
    return lines


def _mib(value: Any) -> str:
    return "n/a" if value is None else f"{value / 2**20:.2f} MiB"


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
