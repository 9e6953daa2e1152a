"""promote.approval: which gate decisions wait for a person, and how an answer is recorded (user, note, evidence)."""

from __future__ import annotations

import json

import pytest

from pipelines.config import Paths, load_settings
from pipelines.registry import Registry, RegistryError, answer_approval, force_promote, rejection, waiting_approval
from pipelines.stages import promote
from tests.conftest import write_params


def _cfg(tmp_path, approval: str):
    return load_settings(write_params(tmp_path, **{"promote.approval": approval, "promote.max_p_value": 0.05,
                                                   "promote.approval_max_p_value": 0.2})).promote


@pytest.mark.parametrize(("approval", "decision", "waits"), [
    ("never", {"promoted": False, "p_value": 0.1}, None),
    ("borderline", {"promoted": False, "p_value": 0.1}, "borderline: p=0.100 is between"),
    ("borderline", {"promoted": False, "p_value": 0.5}, None),  # clearly worse: the gate's no stands
    ("borderline", {"promoted": True, "p_value": 0.01}, None),  # clearly better
    ("borderline", {"promoted": True, "p_value": 0.01, "slice_losses": [
        {"column": "region", "value": "north", "loss": 0.05}]}, "borderline: loses more than promote.max_slice_loss"),
    ("always", {"promoted": True, "p_value": 0.01}, "promote.approval is always"),
    ("always", {"promoted": True, "reason": "no champion yet"}, "promote.approval is always"),
    ("always", {"promoted": False, "p_value": 0.9}, None),
    ("always", {"promoted": False, "p_value": 0.1, "over_budget": True}, None),  # a hard limit is not asked about
])
def test_which_decisions_wait_for_approval(tmp_path, approval, decision, waits):
    why = promote.approval_needed(_cfg(tmp_path, approval), decision)
    assert (why is None) if waits is None else why.startswith(waits)


def test_approval_p_value_must_not_be_below_the_gates(tmp_path):
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="approval_max_p_value 0.01 is below promote.max_p_value"):
        load_settings(write_params(tmp_path, **{"promote.approval_max_p_value": 0.01}))


def _registry_with_waiting_challenger(root) -> Registry:
    registry = Registry(root / "registry")
    for version in ("v1", "v2"):
        bundle = root / version
        bundle.mkdir(parents=True)
        (bundle / "metadata.json").write_text(json.dumps({"version": version}))
        registry.register(bundle)
    force_promote(registry, "v1", "first")
    registry.record({"action": "gate", "challenger": "v2", "champion_before": "v1", "champion_after": "v1",
                     "promoted": False, "awaiting_approval": True, "p_value": 0.1, "reason": "waiting for approval"})
    return registry


def test_an_answer_is_a_decision_with_user_note_and_evidence(tmp_path):
    registry = _registry_with_waiting_challenger(tmp_path)
    assert waiting_approval(registry)["challenger"] == "v2"
    rejected = answer_approval(registry, False, "ann", "north region worse")
    assert registry.champion == "v1" and rejection(registry, "v2") == registry.decisions()[-1] == rejected
    assert (rejected["action"], rejected["by"], rejected["note"], rejected["p_value"]) == (
        "reject", "ann", "north region worse", 0.1)
    with pytest.raises(RegistryError, match="no challenger waits for approval"):  # answered: nothing waits
        answer_approval(registry, True, "bob", "")

    registry.record({**rejected, "action": "gate", "by": None, "awaiting_approval": True})  # asked again
    approved = answer_approval(registry, True, "bob", "fine by risk")
    assert registry.champion == "v2" and approved["champion_after"] == "v2" and rejection(registry, "v2") is None
    assert [(d["action"], d.get("by")) for d in registry.decisions()[-2:]] == [("gate", None), ("approve", "bob")]


def test_timeout_rejects(tmp_path):
    registry = _registry_with_waiting_challenger(tmp_path)
    decision = answer_approval(registry, False, None, "", timed_out=True)
    assert decision["reason"] == "rejected by nobody in time" and registry.champion == "v1"


def test_cli_answers_and_says_when_nothing_waits(tmp_path, capsys):
    from pipelines.cli import main

    write_params(tmp_path)
    registry = _registry_with_waiting_challenger(tmp_path / "models")
    assert registry.root == Paths(tmp_path).registry
    args = ["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path), "promote"]
    assert main([*args, "--approve", "--note", "signed off"]) == 0
    assert json.loads(capsys.readouterr().out)["promote"]["by"] and registry.champion == "v2"
    assert json.loads(Paths(tmp_path).promotion.read_text())["note"] == "signed off"
    assert main([*args, "--reject"]) == 2 and "no challenger waits for approval" in capsys.readouterr().err
    assert main([*args, "--reject", "--approve"]) == 2
    assert "one of --approve and --reject" in capsys.readouterr().err


def test_a_waiting_stage_stops_the_command_with_the_way_to_answer(capsys):
    """Exit code 3: `dvc repro` and `amaas run` stop at promote, saying how to answer."""
    from pipelines.cli import _stopped

    assert _stopped({"promoted": True}) == 0
    assert _stopped({"awaiting_approval": True, "reason": "waiting for approval (borderline: p=0.100)"}) == 3
    err = capsys.readouterr().err
    assert "amaas: waiting for approval (borderline: p=0.100)" in err and "amaas promote --approve --note" in err
