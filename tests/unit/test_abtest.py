"""The canary's A/B test on a simulated prediction log with delayed labels: verdicts per task, the rows each
route needs, serve.canary_policy auto (promote, end the canary, the registry decision, the cool-down) and
`amaas ab-report`. Models are stub bundles (the test reads only their classes, labels and cut-off)."""

from __future__ import annotations

import json
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipelines import abtest, cli
from pipelines.bundle import ModelBundle
from pipelines.config import Paths, Settings, load_settings
from pipelines.io import write_json
from pipelines.registry import Registry, aliases_from_decisions
from pipelines.state.predlog import PredictionRecord
from pipelines.transform import FeatureTransform
from tests.conftest import write_params

TASKS = {"binary": ({"promote.metric": "roc_auc", "serve.ab_test.min_effect": 0.08}, [0, 1]),
         "multiclass": ({"schema.task": "multiclass", "promote.metric": "accuracy", "serve.ab_test.min_effect": 0.08},
                        ["low", "mid", "high"]),
         "regression": ({"schema.task": "regression", "promote.metric": "rmse", "serve.ab_test.min_effect": 0.5}, None)}
NOISE = {"champion": 1.0, "better": 0.4, "worse": 2.0, "same": 1.0}  # each model's error on the latent signal
START = datetime(2026, 3, 1, tzinfo=UTC)


def settings_for(tmp_path: Path, task: str, **overrides: Any) -> Settings:
    return load_settings(write_params(tmp_path / "params", **TASKS[task][0], **{
        "serve.canary_share": 0.5, "serve.canary_policy": "auto", "promote.bootstrap_samples": 100, **overrides}))


def stub(task: str, version: str) -> ModelBundle:
    transform = FeatureTransform(numeric=[], categorical=[], normalize=True, impute="median",
                                 missing_indicators=False, fill_values={}, clip_low={}, clip_high={}, means={},
                                 stds={}, vocab={}, task=task, classes=TASKS[task][1])
    return ModelBundle(transform=transform, ensemble=None, metadata={"version": version, "threshold": 0.5})


def answer(task: str, signal: float, classes: list[Any] | None) -> dict[str, Any]:
    """What the service logs for a model that sees `signal`."""
    if task == "regression":
        return {"value": 3 * signal}
    if task == "binary":
        p = float(1 / (1 + np.exp(-2 * signal)))
        return {"label": int(p >= 0.5), "probabilities": {"0": 1 - p, "1": p}, "probability": p}
    logits = np.array([-4 * (signal + 0.5), 0.0, 4 * (signal - 0.5)])
    probs = np.exp(logits) / np.exp(logits).sum()
    assert classes is not None
    return {"label": classes[int(np.argmax(probs))], "probabilities": dict(zip(classes, probs.tolist(), strict=True))}


def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str, challenger: str, rows: int = 3000,
            labelled_share: float = 0.9) -> tuple[Settings, Paths]:
    """A registry (champion v1, challenger v2), a prediction log of `rows` served rows, half on each route
    (the champion's rows start a day before the canary), and the labels of `labelled_share` of them."""
    settings, paths = settings_for(tmp_path, task), Paths(tmp_path)
    classes = TASKS[task][1]
    models = {"v1": stub(task, "v1"), "v2": stub(task, "v2")}
    monkeypatch.setattr(Registry, "load", lambda self, version, role="": models[version])
    for version in models:
        write_json(paths.registry / "versions" / version / "metadata.json", {"version": version})
    write_json(paths.registry_aliases, {"champion": "v1", "challenger": "v2", "champion_history": []})

    rng = np.random.default_rng(zlib.crc32(f"{task} {challenger}".encode()))
    latent = rng.normal(0, 1, rows)
    if task == "regression":
        truth: list[Any] = list(3 * latent + rng.normal(0, 1, rows))
    elif task == "binary":
        truth = list((rng.random(rows) < 1 / (1 + np.exp(-2 * latent))).astype(int))
    else:
        assert classes is not None
        truth = [classes[i] for i in np.digitize(latent + rng.normal(0, 0.5, rows), [-0.5, 0.5])]
    on_challenger = rng.random(rows) < 0.5
    on_challenger[0] = True  # the canary starts with the first row
    lines = [PredictionRecord(time=(START - timedelta(days=1)).isoformat(), id=-1 - i, route="champion",
                              model_version="v1", **answer(task, 0.0, classes)).to_json() for i in range(50)]
    for i in range(rows):  # one id is served twice (a retry): it counts once
        route, noise = ("challenger", NOISE[challenger]) if on_challenger[i] else ("champion", NOISE["champion"])
        signal = latent[i] + noise * rng.normal()
        at = (START + timedelta(seconds=i)).isoformat()
        lines += [PredictionRecord(time=at, id=i, route=route, model_version="v2" if route == "challenger" else "v1",
                                   request_id=f"r{i}-{k}", features={"x": float(latent[i])},
                                   **answer(task, signal, classes)).to_json() for k in range(1 + (i == 0))]
    paths.prediction_log.mkdir(parents=True)
    (paths.prediction_log / "2026-03-01-1.jsonl").write_text("\n".join(lines) + "\n")
    labelled = int(rows * labelled_share)  # the newest rows' labels have not arrived yet
    target = settings.data_schema.target
    paths.validated.mkdir(parents=True)
    pd.DataFrame({"loan_id": np.arange(labelled), target: truth[:labelled]}).to_parquet(paths.validated_rows)
    return settings, paths


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
@pytest.mark.parametrize(("challenger", "verdict"), [("better", "challenger_wins"), ("worse", "challenger_loses")])
def test_a_better_challenger_wins_and_a_worse_one_loses(tmp_path, monkeypatch, task, challenger, verdict):
    settings, paths = project(tmp_path, monkeypatch, task, challenger)
    result = abtest.ab_report(settings, paths)
    print(abtest.describe(result))
    assert result["verdict"] == verdict, result["reasons"]
    better = result["gain"] > 0 and result["ci_low"] > 0
    assert better if verdict == "challenger_wins" else result["gain"] < 0 and result["ci_high"] < 0
    assert result["p_value"] <= settings.promote.max_p_value
    for role in ("champion", "challenger"):
        route = result[role]
        assert route["served_rows"] > 1300 and 0 < route["labeled_rows"] < route["served_rows"]
        assert settings.serve.ab_test.min_rows <= route["rows_needed"] <= route["labeled_rows"]
    served = result["champion"]["served_rows"] + result["challenger"]["served_rows"]
    assert served == 3001  # with the retry, without the champion's day before the canary
    json.dumps(result, allow_nan=False)


def test_auto_policy_promotes_a_winner_ends_a_loser_and_records_each_decision(tmp_path, monkeypatch, caplog):
    settings, paths = project(tmp_path / "win", monkeypatch, "regression", "better")
    won = abtest.ab_report(settings, paths)
    action = abtest.apply_policy(settings, paths, won, now=START)
    registry = Registry(paths.registry)
    assert action["taken"] == "promoted" and registry.champion == "v2"
    decision = registry.decisions()[-1]
    assert decision["action"] == "ab_test" and decision["verdict"] == "challenger_wins"
    assert (decision["champion_before"], decision["champion_after"]) == ("v1", "v2")
    assert aliases_from_decisions(registry.decisions())["champion"] == "v2"
    assert "ALERT ab_test: A/B test: challenger v2 promoted over v1" in caplog.text

    settings, paths = project(tmp_path / "lose", monkeypatch, "regression", "worse")
    lost = abtest.ab_report(settings, paths)
    action = abtest.apply_policy(settings, paths, lost, now=START)
    registry = Registry(paths.registry)
    assert action["taken"] == "canary_ended" and registry.aliases()["challenger"] is None
    assert registry.champion == "v1" and registry.decisions()[-1]["tested_challenger"] == "v2"
    assert aliases_from_decisions(registry.decisions())["challenger"] is None  # a rebuilt registry keeps it ended
    after = abtest.ab_report(settings, paths)
    assert after["verdict"] == "no_ab_test" and "no challenger beside the champion v1" in after["reasons"][0]

    manual = settings_for(tmp_path / "lose", "regression", **{"serve.canary_policy": "manual"})
    assert abtest.apply_policy(manual, paths, lost, now=START)["taken"] == "none"


def test_the_cool_down_holds_off_the_next_decision(tmp_path, monkeypatch):
    settings, paths = project(tmp_path, monkeypatch, "regression", "worse")
    result = abtest.ab_report(settings, paths)
    assert abtest.apply_policy(settings, paths, result, now=START)["taken"] == "canary_ended"
    write_json(paths.registry_aliases, {"champion": "v1", "challenger": "v2", "champion_history": []})  # re-registered
    held = abtest.apply_policy(settings, paths, result, now=START + timedelta(hours=23))
    assert held["taken"] == "none" and held["reason"].startswith("cool-down")
    assert held["cooldown_until"] == "2026-03-02T00:00:00+00:00"
    assert len(Registry(paths.registry).decisions()) == 1
    assert abtest.apply_policy(settings, paths, result, now=START + timedelta(hours=25))["taken"] == "canary_ended"


def test_too_few_rows_is_inconclusive_and_says_how_many_are_needed(tmp_path, monkeypatch):
    settings, paths = project(tmp_path, monkeypatch, "regression", "worse", rows=600)
    result = abtest.ab_report(settings, paths)
    assert result["verdict"] == "inconclusive" and result["reasons"][0].startswith("not enough labelled rows yet")
    assert all(result[r]["labeled_rows"] < result[r]["rows_needed"] for r in ("champion", "challenger"))
    assert abtest.apply_policy(settings, paths, result, now=START)["taken"] == "none"
    assert Registry(paths.registry).champion == "v1" and Registry(paths.registry).decisions() == []


def test_equal_models_with_enough_rows_are_inconclusive(tmp_path, monkeypatch):
    settings, paths = project(tmp_path, monkeypatch, "regression", "same")
    result = abtest.ab_report(settings, paths)
    assert result["verdict"] == "inconclusive" and result["reasons"][0].startswith("no significant difference")
    assert result["ci_low"] < 0 < result["ci_high"]


def test_no_ab_test_without_a_canary_and_no_verdict_without_labels(tmp_path, monkeypatch):
    settings, paths = project(tmp_path, monkeypatch, "binary", "better")
    off = abtest.ab_report(settings_for(tmp_path, "binary", **{"serve.canary_share": 0.0}), paths)
    assert off["verdict"] == "no_ab_test" and "serve.canary_share is 0" in off["reasons"][0]
    paths.validated_rows.unlink()
    unlabelled = abtest.ab_report(settings, paths)
    assert unlabelled["verdict"] == "inconclusive" and unlabelled["challenger"]["labeled_rows"] == 0


def test_rows_needed_is_the_textbook_count_for_a_proportion():
    """accuracy near 0.5: variance per row p(1 - p) = 0.25; a 0.05 difference at alpha 0.05 two-sided and power
    0.8 needs 2 * 0.25 * (1.96 + 0.84)^2 / 0.05^2 = 1570 rows per route at an even split."""
    needed = abtest.rows_needed({"champion": 0.25, "challenger": 0.25}, 0.5, 0.05, 0.025, 0.8)
    assert needed == {"champion": 1570, "challenger": 1570}
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    outputs = {role: np.eye(2)[np.where(rng.random(2000) < 0.5, y, 1 - y)] for role in ("champion", "challenger")}
    stats = abtest.bootstrap_difference("accuracy", {r: (y, o, 0.5) for r, o in outputs.items()}, 300, 0, True,
                                        0.025, True)
    assert stats is not None and all(0.2 < v < 0.3 for v in stats["variance_per_row"].values())


def test_ab_report_prints_text_and_strict_json(tmp_path, monkeypatch, capsys):
    settings, paths = project(tmp_path, monkeypatch, "regression", "better")
    args = ["--params", str(tmp_path / "params" / "params.yaml"), "--root", str(tmp_path), "ab-report"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "verdict: challenger_wins" in text and "champion   v1: rmse" in text and "gain of the challenger +" in text
    assert cli.main([*args, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert printed["verdict"] == "challenger_wins" and printed["test"]["sided"] == "two-sided"
