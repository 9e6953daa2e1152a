"""promote: the challenger replaces the champion only if it is measurably better on the same rows.

Gate: the gain of the challenger over the champion in promote.metric on the current held-out test rows
(in the metric's direction: a lower RMSE or log loss is a gain) must be at least promote.min_improvement,
and a paired bootstrap must say the gain is significant (share of resamples with gain <= 0 at most
promote.max_p_value). A challenger that serves too slowly or too dearly (promote.max_latency_ms on its single-row
p99, promote.max_cost_per_1k; the compress stage's figures) is not promoted either. The decision and its numbers
are recorded in the registry and in reports/promotion.json; the model card (Markdown and one HTML page, with the
evaluate stage's ROC, calibration, confusion or residual pictures) beside the version and in reports/.

Approval (promote.approval): with `borderline`, a challenger whose p-value lies between promote.max_p_value and
promote.approval_max_p_value, or that loses more than promote.max_slice_loss on a value of an evaluate.slices
column, waits for a person; with `always`, so does every change of champion the gate would make. The decision is
then recorded as waiting; the person's answer (`amaas promote --approve/--reject --note`, or the approval task of
the training_pipeline DAG) is recorded as a decision of its own, with their name and note. A rejected challenger
stays rejected when the stage runs again.
"""

from __future__ import annotations

import getpass
import logging
from typing import Any

import pandas as pd

from pipelines import modelcard
from pipelines.alerts import alert
from pipelines.bundle import METADATA_FILE, ModelBundle
from pipelines.config import Paths, PromoteConfig, Settings, experiment_name
from pipelines.contracts import Option, Out, stage
from pipelines.io import read_json, write_json, write_text
from pipelines.metrics import improvement, paired_bootstrap, score, slice_metrics
from pipelines.registry import Registry, answer_approval, force_promote, rejection
from pipelines.serving.bento import ensure_bento, publish_bento
from pipelines.state import shared

log = logging.getLogger(__name__)


@stage(
    params=("seed", "schema.target", "promote", "evaluate.slices"),
    runtime=("alerts", "state", "serve"),  # serve: the champion's bento, built for a fleet's artifacts store
    deps=("challenger", "reference", "metrics", "slices", "plots", "validation_report", "drift_report",
          "compression_report", "explain_report"),
    # the registry accumulates versions across runs: DVC must not delete it before the stage runs
    outs=(Out("registry", cache=False, persist=True), Out("model_card", cache=False),
          Out("model_card_html", cache=False)),
    metrics=("promotion",),
    atomic_outs=True,  # each written to a temp file or folder and renamed: DVC need not delete them first
    options=(Option("--force", switch=True, default=False, help="skip the gate: make a version champion"),
             Option("--version", help="with --force: the version to promote (default: the challenger)"),
             Option("--reason", default="", help="why (recorded in the registry)"),
             Option("--approve", switch=True, default=False, help="approve the challenger that waits for approval"),
             Option("--reject", switch=True, default=False, help="reject the challenger that waits for approval"),
             Option("--note", default="", help="with --approve/--reject: your note (recorded in the registry)")),
    description="Register the challenger; it becomes champion only if it passes the significance gate",
)
def run(settings: Settings, paths: Paths, force: bool = False, version: str | None = None, reason: str = "",
        approve: bool = False, reject: bool = False, note: str = "") -> dict[str, Any]:
    """Register the challenger; make it champion if the gate passes (or if there is no champion).

    Under `dvc exp run` the registry is left alone: the decision the gate would take is recorded in
    reports/promotion.json only, so an experiment never changes the champion. `force` (an operator's
    `amaas promote --force`) makes `version` (default: the challenger) champion without the gate; `approve` or
    `reject` answers the challenger that waits for approval, with the user's name and `note`."""
    if approve or reject:
        if approve == reject or force:
            raise ValueError("pass one of --approve and --reject (without --force)")
        return answer(settings, paths, approve, getpass.getuser(), note)
    registry = Registry.of(paths, settings)
    if force:
        forced = force_promote(registry, version, reason)
        publish_champion(settings, paths, registry)
        return {"champion": forced, "forced": True}
    cfg = settings.promote
    experiment = experiment_name()
    reports = {"validation": paths.validation_report, "drift": paths.drift_report, "metrics": paths.metrics,
               "slices": paths.slices, "compression": paths.compression_report, "explain": paths.explain_report}
    found = {name: read_json(path) if path.is_file() else {} for name, path in reports.items()}
    extra = {"reports": {name: str(path.relative_to(paths.root)) for name, path in reports.items()},
             "metrics": found["metrics"]}
    if experiment:
        challenger, bundle_dir = str(read_json(paths.challenger / METADATA_FILE)["version"]), paths.challenger
    else:
        monitoring = {Paths.SAMPLE_FILE: paths.train_sample, Paths.TEST_PREDICTIONS_FILE: paths.test_predictions}
        challenger = registry.register(paths.challenger, extra, {k: v for k, v in monitoring.items() if v.is_file()})
        bundle_dir = registry.version_dir(challenger)
    champion = registry.checked_aliases()["champion"]
    decision: dict[str, Any] = {"challenger": challenger, "champion_before": champion, "metric": cfg.metric,
                                "min_improvement": cfg.min_improvement, "max_p_value": cfg.max_p_value}
    serving = found["compression"].get("served_figures", {})
    decision["serving"] = {"model": found["compression"].get("served"),
                           **{k: serving.get(k) for k in ("latency_ms_p50", "latency_ms_p99", "rows_per_s",
                                                          "usd_per_1k_rows")}}
    if (over := over_budget(cfg, serving)) is not None:
        decision |= {"promoted": False, "over_budget": True, "reason": over}
    elif champion is None:
        bundle = ModelBundle.load(bundle_dir)
        test = pd.read_parquet(paths.test_rows)
        value = score(cfg.metric, bundle.transform.encode_target(test[settings.data_schema.target]),
                      bundle.predict(test), bundle.decision)
        decision |= first_champion(cfg.metric, value, cfg.min_first_metric)
    elif champion == challenger:
        decision |= {"promoted": False, "reason": "challenger is already the champion"}
    elif (rejected := rejection(registry, challenger)) is not None:
        decision |= {"promoted": False, "reason": f"rejected by {rejected.get('by') or 'the approval timeout'} at "
                                                  f"{rejected.get('at')}: {rejected.get('note') or 'no note'}"}
    else:
        decision |= gate(settings, paths, registry.load(champion, "champion"), ModelBundle.load(bundle_dir))
    if not experiment and (why := approval_needed(cfg, decision)) is not None:
        decision |= {"promoted": False, "awaiting_approval": True, "gate_promoted": decision["promoted"],
                     "reason": f"waiting for approval ({why}); the gate: {decision['reason']}"}
    if experiment:
        decision |= {"experiment": experiment, "would_promote": decision["promoted"], "promoted": False,
                     "reason": f"experiment {experiment}: the registry is left as it is; the gate would say: "
                               f"{decision['reason']}"}
    decision["champion_after"] = challenger if decision["promoted"] else champion
    if decision["promoted"]:  # the new champion and its decision: one transaction in a fleet's database
        registry.set_champion(challenger, {"action": "gate", **decision})
        publish_champion(settings, paths, registry)
    elif not experiment:
        registry.record({"action": "gate", **decision})
    write_json(paths.promotion, decision)
    card = modelcard.card({**read_json(bundle_dir / METADATA_FILE), **({} if not experiment else extra)},
                          found["metrics"], found["slices"], found["validation"], found["drift"], decision,
                          settings.data_schema.target, found["compression"],
                          read_json(paths.cost_report) if paths.cost_report.is_file() else {},
                          modelcard.read_plots(paths), found["explain"])
    markdown, page = modelcard.markdown(card), modelcard.html(card)
    if not experiment:
        write_text(registry.version_dir(challenger) / Paths.MODEL_CARD_FILE, markdown)
        write_text(registry.version_dir(challenger) / Paths.MODEL_CARD_HTML_FILE, page)
    write_text(paths.model_card, markdown)
    write_text(paths.model_card_html, page)
    if decision.get("awaiting_approval"):
        alert(settings, paths, "approval_needed", f"challenger {challenger}: {decision['reason']}", decision)
    elif ("gain" in decision or decision.get("over_budget")) and not decision["promoted"] and not experiment:
        alert(settings, paths, "gate_failed", f"challenger {challenger} not promoted: {decision['reason']}",
              decision)
    log.info("promote done: %s -> champion %s (%s)", challenger, decision["champion_after"], decision["reason"])
    return decision


def approval_needed(cfg: PromoteConfig, decision: dict[str, Any]) -> str | None:
    """Why a person must approve (promote.approval), or None: the gate's decision stands."""
    if cfg.approval == "never" or decision.get("over_budget"):
        return None
    borderline = []
    p_value = decision.get("p_value")
    if p_value is not None and cfg.max_p_value < p_value <= cfg.approval_max_p_value:
        borderline.append(f"p={p_value:.3f} is between promote.max_p_value {cfg.max_p_value} and "
                          f"promote.approval_max_p_value {cfg.approval_max_p_value}")
    if losses := decision.get("slice_losses"):
        borderline.append(f"loses more than promote.max_slice_loss {cfg.max_slice_loss} {cfg.metric} on "
                          + ", ".join(f"{s['column']}={s['value']} ({s['loss']:+.3f})" for s in losses))
    if borderline:
        return "borderline: " + "; ".join(borderline)
    if cfg.approval == "always" and decision["promoted"]:
        return "promote.approval is always"
    return None


def answer(settings: Settings, paths: Paths, approve: bool, by: str | None, note: str,
           timed_out: bool = False) -> dict[str, Any]:
    """Record a person's answer to the challenger that waits for approval (registry.answer_approval; approved,
    its bento is published like a gate's champion) and write it to reports/promotion.json."""
    registry = Registry.of(paths, settings)
    decision = answer_approval(registry, approve, by, note, timed_out)
    if approve:
        publish_champion(settings, paths, registry)
    write_json(paths.promotion, decision)
    log.info("promote answered: %s %s -> champion %s", decision["challenger"], decision["reason"],
             decision["champion_after"])
    return decision


def approval_request(settings: Settings, paths: Paths, pending: dict[str, Any]) -> tuple[str, str]:
    """The subject and Markdown body of the request to approve `pending` (a decision that waits): the metrics of
    challenger and champion, the gate's figures, the slices, latency and cost, links to the card and drift report."""
    registry = Registry.of(paths, settings)
    challenger, champion = pending["challenger"], pending["champion_before"]
    metrics = [read_json(registry.version_dir(v) / METADATA_FILE).get("metrics", {}) if v else {}
               for v in (challenger, champion)]
    names = [k for k, v in metrics[0].items() if isinstance(v, int | float) and not isinstance(v, bool)
             and k not in ("test_rows", "threshold")]
    rows = [f"| {name} | {_figure(metrics[0].get(name))} | {_figure(metrics[1].get(name))} |" for name in names]
    gate_line = (f"gain {pending['gain']:+.4f} {pending['metric']} (95% CI {pending['ci_low']:+.4f} to "
                 f"{pending['ci_high']:+.4f}), p = {pending['p_value']:.3f}; the gate needs >= "
                 f"{pending['min_improvement']} and p <= {pending['max_p_value']}"
                 if pending.get("gain") is not None else pending["reason"])
    slices = [f"- {s['column']} = {s['value']} ({s['rows']} rows): {_figure(s['champion'])} -> "
              f"{_figure(s['challenger'])}" for s in pending.get("slice_losses", [])]
    serving = pending.get("serving") or {}
    links = [f"[{title}]({path.as_uri()})" for title, path in (("Model card", paths.model_card_html),
                                                               ("Drift report", paths.drift_html)) if path.is_file()]
    body = "\n".join([
        f"**{pending['reason']}**", "",
        f"| metric (test rows) | challenger {challenger} | champion {champion} |", "|---|---|---|", *rows, "",
        f"**Gate:** {gate_line}", "",
        f"**Slices losing more than promote.max_slice_loss {settings.promote.max_slice_loss}:**",
        *(slices or ["- none"]), "",
        f"**Serving ({serving.get('model')}):** single-row latency p50 {_figure(serving.get('latency_ms_p50'), 2)} ms, "
        f"p99 {_figure(serving.get('latency_ms_p99'), 2)} ms; "
        + ("no cost figure" if serving.get("usd_per_1k_rows") is None else f"${serving['usd_per_1k_rows']:.3g}")
        + " per 1,000 rows", "",
        " · ".join(links) or "(no model card or drift report written yet)", "",
        f"Approve makes {challenger} champion; Reject, or no answer within promote.approval_timeout_min "
        f"({settings.promote.approval_timeout_min:g} min), keeps {champion}."])
    return f"Promote {challenger} over champion {champion}?", body


def _figure(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def publish_champion(settings: Settings, paths: Paths, registry: Registry) -> None:
    """With an artifacts store, the champion's bento is there (built if missing), where a fleet's replicas fetch
    it from when they follow the registry."""
    if shared(settings, paths).cfg.artifacts_url is None or registry.champion is None:
        return
    bundle = registry.champion_dir()
    publish_bento(settings, paths, bundle, ensure_bento(settings, paths, bundle)["bento_tag"])


def over_budget(cfg: PromoteConfig, serving: dict[str, Any]) -> str | None:
    """Why the challenger serves too slowly or too dearly (promote.max_latency_ms, promote.max_cost_per_1k, on
    the compress stage's figures of it), or None."""
    limits = (("latency_ms_p99", cfg.max_latency_ms, "single-row p99 latency {:.2f} ms", "promote.max_latency_ms"),
              ("usd_per_1k_rows", cfg.max_cost_per_1k, "serving cost ${:.6f} per 1,000 rows",
               "promote.max_cost_per_1k"))
    for key, limit, what, name in limits:
        if limit is None:
            continue
        if serving.get(key) is None:
            return f"{name} is set, but reports/compression.json has no {key} of the challenger: run `amaas compress`"
        if serving[key] > limit:
            return f"over budget: {what.format(serving[key])} is over {name} {limit}: not promoted"
    return None


def first_champion(metric: str, value: float | None, minimum: float | None) -> dict[str, Any]:
    """The first champion needs a defined metric that reaches promote.min_first_metric (when set)."""
    if value is None:
        return {"promoted": False, "reason": f"no champion yet, but the challenger's {metric} is undefined on the "
                                             f"test rows (see reports/metrics.json): not promoted"}
    if minimum is not None and improvement(metric, value, minimum) < 0:
        return {"promoted": False, "reason": f"no champion yet, but the challenger's {metric} {value:.4f} does not "
                                             f"reach promote.min_first_metric {minimum}: not promoted"}
    floor = f" reaches promote.min_first_metric {minimum}" if minimum is not None else ""
    return {"promoted": True, "reason": f"no champion yet: {metric} {value:.4f} on the test rows{floor}"}


def gate(settings: Settings, paths: Paths, champion: ModelBundle, challenger: ModelBundle) -> dict[str, Any]:
    """Paired bootstrap of the challenger against the champion on this run's test rows."""
    cfg = settings.promote
    if (champion.task, champion.classes) != (challenger.task, challenger.classes):
        return {"promoted": False, "reason": f"the champion predicts {champion.task} {champion.classes}, the "
                                             f"challenger {challenger.task} {challenger.classes}: they cannot be "
                                             f"compared on the same rows; promote by hand with `amaas promote "
                                             f"--force` if the change is intended"}
    test = pd.read_parquet(paths.test_rows)
    y = challenger.transform.encode_target(test[settings.data_schema.target])
    old, new = champion.predict(test), challenger.predict(test)
    stats = paired_bootstrap(cfg.metric, y, old, new, cfg.bootstrap_samples, settings.seed,
                             (champion.decision, challenger.decision), classification=challenger.classes is not None)
    if stats["gain"] is None:
        return {"promoted": False, "reason": f"{cfg.metric} is undefined on the test rows: no verdict", **stats}
    better = stats["gain"] >= cfg.min_improvement and stats["p_value"] <= cfg.max_p_value
    reason = (f"gain {stats['gain']:+.4f} {cfg.metric} (p={stats['p_value']:.3f}) "
              + ("passes" if better else "fails") + f" the gate (>= {cfg.min_improvement}, p <= {cfg.max_p_value})")
    columns, task = settings.evaluate.slices, challenger.task
    before = slice_metrics(test, y, old, columns, task, cfg.metric, champion.decision)
    after = slice_metrics(test, y, new, columns, task, cfg.metric, challenger.decision)
    losses = [{"column": column, "value": value, "rows": found["rows"], "champion": before[column][value][cfg.metric],
               "challenger": found[cfg.metric],
               "loss": -improvement(cfg.metric, found[cfg.metric], before[column][value][cfg.metric])}
              for column, values in after.items() for value, found in values.items()
              if found[cfg.metric] is not None and before[column][value][cfg.metric] is not None]
    return {"promoted": better, "reason": reason, **stats,
            "slice_losses": [loss for loss in losses if loss["loss"] > cfg.max_slice_loss]}


