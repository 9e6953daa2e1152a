"""The A/B test of a canary: champion and challenger on live traffic, judged on delayed labels, with a verdict.

With serve.canary_share > 0 both models answer requests, and the prediction log says which route each answer
took (champion | challenger) and which version gave it. A route's rows are those its own model answered since
the challenger's first answer (so both routes cover the same days); the labels that arrive later in the
validated data join them by the row key, as monitoring joins them (pipelines.labels), and promote.metric is
computed per route.

The test is a two-sample bootstrap of the gain: the challenger's metric less the champion's, in the metric's
direction (positive: the challenger is better; a lower RMSE is a gain), like the promotion gate's gain. Each
route is resampled on its own, since the routes hold different rows and nothing pairs them; the share of
resamples with a gain at or below zero is the one-sided p-value of a win, the share at or above zero that of
a loss. A z-test would do for accuracy (a proportion) or MAE (a mean), but ROC-AUC, PR-AUC, F1, Cohen's kappa,
RMSE and R² are not means of per-row values: the bootstrap treats every metric of every task alike, with no
normal approximation of its own, and it is the gate's kind of test (paired there: both models score the same
test rows). alpha is the gate's, promote.max_p_value; serve.ab_test.sided tests each direction at alpha/2
(two-sided) or at alpha (one-sided).

Power: the bootstrap variance of a route's metric times its rows is the route's variance per row, v. At the
routes' ratio of labelled rows, each route needs the rows n that bring the difference's standard error
sqrt(v_champion / n_champion + v_challenger / n_challenger) down to min_effect / (z(1 - alpha') + z(power)),
and at least serve.ab_test.min_rows. The verdict waits until both routes have them: a fixed horizon, because
taking the first significant look at a growing sample calls many more wins than alpha allows.

Verdicts: no_ab_test (no canary: canary_share 0, shadow on, or no challenger beside the champion),
inconclusive (too few labelled rows, or no significant difference), challenger_wins, challenger_loses; each
with its reasons. `apply_policy` (the report stage runs it) acts on a verdict when serve.canary_policy is auto.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from pipelines.alerts import alert
from pipelines.bundle import ModelBundle
from pipelines.config import Paths, Settings, experiment_name
from pipelines.labels import ACTUAL, ROUTE, TIME, VERSION, join_labels, logged_frame, model_output
from pipelines.metrics import Decision, bootstrap_resamples, higher_is_better, score
from pipelines.registry import Registry
from pipelines.state import shared

ROLES = ("champion", "challenger")
DECISION = "ab_test"  # the action of its registry decisions and the kind of its alerts
WIN, LOSS = "challenger_wins", "challenger_loses"
MAX_ROWS = 50_000  # a route's rows the bootstrap resamples at most (more: a random subset; the interval only widens)


def ab_report(settings: Settings, paths: Paths) -> dict[str, Any]:
    """The A/B test of the registry's champion and challenger on the prediction log: each route's metric and
    rows, the challenger's gain and its significance, the rows each route needs, the verdict and its reasons."""
    serve, metric = settings.serve, settings.promote.metric
    aliases = Registry.of(paths, settings).aliases()
    versions = {role: aliases[role] for role in ROLES}
    result: dict[str, Any] = {
        "verdict": "no_ab_test", "reasons": [], "metric": metric, "higher_is_better": higher_is_better(metric),
        "task": settings.data_schema.task, "canary_share": serve.canary_share, "canary_policy": serve.canary_policy,
        "test": test_settings(settings), **{role: {"version": versions[role]} for role in ROLES}}
    if serve.canary_share == 0:
        return result | {"reasons": ["serve.canary_share is 0: the challenger answers no live traffic"]}
    if serve.shadow:
        return result | {"reasons": ["serve.shadow is on: the champion answers every request (the challenger only "
                                     "scores them in its shadow), so there is no canary to compare"]}
    if versions["champion"] is None or versions["challenger"] in (None, versions["champion"]):
        return result | {"reasons": [f"no challenger beside the champion {versions['champion']} in the registry: "
                                     f"the next `amaas promote` registers one"]}
    registry = Registry.of(paths, settings)
    models = {role: registry.load(versions[role], role) for role in ROLES}
    if (models["champion"].task, models["champion"].classes) != (models["challenger"].task,
                                                                 models["challenger"].classes):
        return result | {"verdict": "inconclusive", "reasons": [
            f"the champion predicts {models['champion'].task} {models['champion'].classes}, the challenger "
            f"{models['challenger'].task} {models['challenger'].classes}: their results cannot be compared"]}
    routes, window = labelled_routes(settings, paths, models)
    for role in ROLES:
        result[role] |= {"served_rows": window[f"{role}_rows"], "labeled_rows": len(routes[role])}
    return result | {"window_start": window["start"]} | compare(settings, routes, models, result)


def test_settings(settings: Settings) -> dict[str, Any]:
    cfg = settings.serve.ab_test
    return {"method": "two-sample bootstrap of the gain", "sided": cfg.sided,
            "alpha": settings.promote.max_p_value, "min_effect": cfg.min_effect, "power": cfg.power,
            "min_rows": cfg.min_rows, "resamples": settings.promote.bootstrap_samples}


def labelled_routes(settings: Settings, paths: Paths, models: dict[str, ModelBundle]
                    ) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Each route's logged rows that its own model answered since the challenger's first answer (one per row
    key: a retried row counts once), with their labels; and the window (its start, the rows served per route)."""
    schema = settings.data_schema
    records = shared(settings, paths).predictions()
    frame = logged_frame(records, schema, models["champion"].classes)
    window: dict[str, Any] = {"start": None, "champion_rows": 0, "challenger_rows": 0}
    if frame.empty:
        return {role: frame for role in ROLES}, window
    answered = {role: (frame[ROUTE] == role) & (frame[VERSION] == models[role].version) for role in ROLES}
    times = pd.to_datetime(frame[TIME], utc=True)
    if answered["challenger"].any():
        start = times[answered["challenger"]].min()
        window["start"] = start.isoformat()
        answered = {role: rows & (times >= start) for role, rows in answered.items()}
    labelled = {role: frame.head(0) for role in ROLES}
    for role in ROLES:
        rows = frame.loc[answered[role]]
        window[f"{role}_rows"] = len(rows)
        if not rows.empty and paths.validated_rows.is_file():
            rows = rows.drop_duplicates(schema.key_column, keep="last")
            labelled[role] = join_labels(rows, paths, schema, models[role])[0]
    return labelled, window


def compare(settings: Settings, routes: dict[str, pd.DataFrame], models: dict[str, ModelBundle],
            result: dict[str, Any]) -> dict[str, Any]:
    """The metric per route (with what `result` holds of each route), the bootstrap of the gain, the rows each
    route needs, and the verdict."""
    cfg, metric, task = settings.serve.ab_test, settings.promote.metric, settings.data_schema.task
    out = {role: dict(result[role]) for role in ROLES}
    alpha = settings.promote.max_p_value
    side_alpha = alpha / 2 if cfg.sided == "two-sided" else alpha
    data, undefined = {}, []
    for role in ROLES:
        frame, model = routes[role], models[role]
        output = model_output(frame, task, len(model.classes or []))
        value = None if output is None else score(metric, frame[ACTUAL].to_numpy(), output, model.decision)
        out[role]["metric"] = None if value is None else round(value, 6)
        if frame.empty:
            undefined.append(f"the {role} route has no labelled rows yet")
        elif output is None or value is None:
            undefined.append(f"{metric} is undefined on the {len(frame)} labelled rows of the {role} route"
                             + (" (one class only?)" if task != "regression" else ""))
        else:
            data[role] = (frame[ACTUAL].to_numpy(), output, model.decision)
    if undefined:
        why = "; ".join(undefined)
        if not all(out[role]["served_rows"] for role in ROLES):
            why = "; ".join(f"the {role} route answered {out[role]['served_rows']} rows" for role in ROLES)
        elif not settings.data_schema.id_column:
            why += " (schema.id_column is null: logged rows carry no id that labels could join)"
        return {**out, "verdict": "inconclusive", "reasons": [f"no verdict yet: {why}"]}
    stats = bootstrap_difference(metric, data, settings.promote.bootstrap_samples, settings.seed,
                                 task != "regression", side_alpha, cfg.sided == "two-sided")
    if stats is None:
        return {**out, "verdict": "inconclusive", "reasons": [f"{metric} is undefined on every resample of a route"]}
    variances = stats.pop("variance_per_row")
    rows = {role: len(data[role][0]) for role in ROLES}
    needed = rows_needed(variances, rows["challenger"] / sum(rows.values()), cfg.min_effect, side_alpha, cfg.power)
    for role in ROLES:
        out[role]["rows_needed"] = max(cfg.min_rows, needed[role])
    verdict, reason = _verdict(settings, out, stats, side_alpha)
    return {**out, "verdict": verdict, "reasons": [reason], **stats}


def _verdict(settings: Settings, routes: dict[str, Any], stats: dict[str, Any], side_alpha: float
             ) -> tuple[str, str]:
    cfg, metric, alpha = settings.serve.ab_test, settings.promote.metric, settings.promote.max_p_value
    short = [f"{role} {r['labeled_rows']} of {r['rows_needed']}" for role, r in routes.items()
             if r["labeled_rows"] < r["rows_needed"]]
    if short:
        return "inconclusive", (f"not enough labelled rows yet to tell a difference of {cfg.min_effect} {metric} "
                                f"with power {cfg.power} at alpha {alpha} ({cfg.sided}): "
                                + ", ".join(short) + " (the verdict waits for them)")
    sides = f"{cfg.sided}, alpha {alpha}"
    found = (f"{metric} {routes['challenger']['metric']:.4f} (challenger {routes['challenger']['version']}) against "
             f"{routes['champion']['metric']:.4f} (champion {routes['champion']['version']}): gain "
             f"{stats['gain']:+.4f}, {stats['confidence']:.0%} interval [{stats['ci_low']:+.4f}, "
             f"{stats['ci_high']:+.4f}], p={stats['p_value']:.4f} ({sides}) on {routes['champion']['labeled_rows']}"
             f" and {routes['challenger']['labeled_rows']} labelled rows")
    if stats["p_win"] <= side_alpha:
        return WIN, f"the challenger is better: {found}"
    if stats["p_loss"] <= side_alpha:
        return LOSS, f"the challenger is worse: {found}"
    return "inconclusive", (f"no significant difference: {found}; with these rows a difference of "
                            f"{cfg.min_effect} would most likely have shown, so any real one is smaller")


def bootstrap_difference(metric: str, routes: dict[str, tuple[np.ndarray, np.ndarray, Decision]], samples: int,
                         seed: int, classification: bool, side_alpha: float, two_sided: bool) -> dict[str, Any] | None:
    """The gain: the challenger's metric less the champion's (positive: better, in the metric's direction), resampling
    each route on its own: the one-sided p-values of a win and of a loss, the test's p-value, the interval of
    confidence 1 - 2 alpha' (alpha' = `side_alpha`, the level of each direction), and each route's metric
    variance per row (the bootstrap variance times its rows).

    `routes`: role -> (encoded labels, canonical output, binary cut-off). None: the metric is undefined on the
    rows or on every resample of a route."""
    rng = np.random.default_rng(seed)
    draws, per_row = {}, {}
    for role in ROLES:
        y, output, threshold = routes[role]
        if len(y) > MAX_ROWS:
            keep = rng.choice(len(y), MAX_ROWS, replace=False)
            y, output = y[keep], output[keep]
        values = [v for idx in bootstrap_resamples(y, samples, rng, classification)
                  if (v := score(metric, y[idx], output[idx], threshold)) is not None]
        draws[role] = np.asarray(values)
        per_row[role] = float(np.var(values)) * len(y) if values else 0.0
    n = min(len(d) for d in draws.values())
    new, old = score(metric, *routes["challenger"]), score(metric, *routes["champion"])
    if n == 0 or new is None or old is None:
        return None
    sign = 1.0 if higher_is_better(metric) else -1.0
    gains = sign * (draws["challenger"][:n] - draws["champion"][:n])
    p_win, p_loss = float(np.mean(gains <= 0)), float(np.mean(gains >= 0))
    p_value = min(1.0, 2 * min(p_win, p_loss)) if two_sided else min(p_win, p_loss)
    return {"gain": round(sign * (new - old), 6), "confidence": round(1 - 2 * side_alpha, 6),
            "ci_low": round(float(np.quantile(gains, side_alpha)), 6),
            "ci_high": round(float(np.quantile(gains, 1 - side_alpha)), 6), "p_value": round(p_value, 6),
            "p_win": round(p_win, 6), "p_loss": round(p_loss, 6), "bootstrap_samples": n, "variance_per_row": per_row}


def rows_needed(variance_per_row: dict[str, float], challenger_share: float, min_effect: float, side_alpha: float,
                power: float) -> dict[str, int]:
    """Labelled rows per route that detect a difference of `min_effect` with `power` at level `side_alpha` per
    direction, the routes keeping `challenger_share` of the rows between them."""
    z = NormalDist().inv_cdf(1 - side_alpha) + NormalDist().inv_cdf(power)
    total = (z / min_effect) ** 2 * (variance_per_row["challenger"] / challenger_share
                                     + variance_per_row["champion"] / (1 - challenger_share))
    return {"champion": math.ceil(total * (1 - challenger_share)), "challenger": math.ceil(total * challenger_share)}


def apply_policy(settings: Settings, paths: Paths, result: dict[str, Any], now: datetime | None = None
                 ) -> dict[str, Any]:
    """What serve.canary_policy does with the verdict in `result`; the action taken, and why.

    auto: challenger_wins makes the challenger champion, challenger_loses ends the canary (the registry's
    challenger alias is cleared; a running server follows the aliases and sends it no more traffic). Either is
    a registry decision (action ab_test, which `aliases_from_decisions` replays like any other) and an alert.
    No decision within serve.ab_test.cooldown_h of the last one; none under `dvc exp run` (an experiment never
    changes the registry); none where the registry changed since `result` was computed."""
    verdict, champion, challenger = result["verdict"], result["champion"]["version"], result["challenger"]["version"]
    if settings.serve.canary_policy == "manual":
        return {"taken": "none", "reason": "serve.canary_policy is manual: the verdict is reported only"}
    if verdict not in (WIN, LOSS):
        return {"taken": "none", "reason": f"no decision on {verdict}"}
    if (experiment := experiment_name()) is not None:
        return {"taken": "none", "reason": f"experiment {experiment}: the registry is left as it is"}
    registry = Registry.of(paths, settings)
    now = now or datetime.now(UTC)
    last = next((d for d in reversed(registry.decisions()) if d.get("action") == DECISION and d.get("at")), None)
    if last is not None:
        until = datetime.fromisoformat(last["at"]) + timedelta(hours=settings.serve.ab_test.cooldown_h)
        if now < until:
            return {"taken": "none", "cooldown_until": until.isoformat(timespec="seconds"),
                    "reason": f"cool-down: the last A/B decision ({last.get('verdict')} at {last['at']}) holds until "
                              f"{until.isoformat(timespec='seconds')} (serve.ab_test.cooldown_h)"}
    aliases = registry.aliases()
    if (aliases["champion"], aliases["challenger"]) != (champion, challenger):
        return {"taken": "none", "reason": f"the registry changed while the test ran (champion {aliases['champion']}, "
                                           f"challenger {aliases['challenger']}): no decision on an old result"}
    if verdict == WIN:
        taken, message = "promoted", f"A/B test: challenger {challenger} promoted over {champion}"
    else:
        taken, message = "canary_ended", f"A/B test: canary of challenger {challenger} ended, {champion} stays"
    decision = {"action": DECISION, "verdict": verdict, "by": "serve.canary_policy: auto",
                "at": now.isoformat(timespec="seconds"), "champion_before": champion,
                "champion_after": challenger if verdict == WIN else champion,
                "challenger": challenger if verdict == WIN else None,
                "tested_challenger": challenger, "reason": result["reasons"][0], "metric": result["metric"],
                **{k: result.get(k) for k in ("gain", "ci_low", "ci_high", "p_value")},
                "labeled_rows": {role: result[role].get("labeled_rows") for role in ROLES}}
    if verdict == WIN:
        registry.set_champion(challenger, decision)
    else:
        registry.clear_challenger(decision)
    alert(settings, paths, DECISION, f"{message}: {result['reasons'][0]}", decision)
    return {"taken": taken, "reason": message, "decision": decision}


def describe(result: dict[str, Any]) -> str:
    """The A/B report in words, for people (`amaas ab-report`)."""
    direction = "higher" if result["higher_is_better"] else "lower"
    lines = [f"A/B test of the canary: {result['metric']} ({direction} is better), canary share "
             f"{result['canary_share']:.2f}, policy {result['canary_policy']}",
             f"verdict: {result['verdict']}"]
    for role in ROLES:
        route = result[role]
        if route.get("version") is None:
            continue
        figures = [f"{result['metric']} {route['metric']:.4f}" if route.get("metric") is not None else None,
                   f"{route['labeled_rows']} labelled of {route['served_rows']} served rows"
                   if "labeled_rows" in route else None,
                   f"needs {route['rows_needed']}" if "rows_needed" in route else None]
        shown = "; ".join(f for f in figures if f)
        lines.append(f"  {role:<10} {route['version']}" + (f": {shown}" if shown else ""))
    if result.get("gain") is not None:
        test = result["test"]
        lines.append(f"  gain of the challenger {result['gain']:+.4f} ({result['confidence']:.0%} interval "
                     f"[{result['ci_low']:+.4f}, {result['ci_high']:+.4f}]), p={result['p_value']:.4f} "
                     f"({test['sided']}, alpha {test['alpha']}; {test['method']}, {result['bootstrap_samples']} "
                     f"resamples)")
    lines += [f"  - {reason}" for reason in result["reasons"]]
    if "action" in result:
        lines.append(f"action: {result['action']['taken']} ({result['action']['reason']})")
    return "\n".join(lines)
