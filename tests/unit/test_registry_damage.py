"""A damaged registry (lost aliases, deleted versions, truncated JSON) stops with the file and the fix, and
never crowns a model that has not passed the gate."""

import json
import shutil

import pytest

from pipelines import registry as registry_ops
from pipelines import score
from pipelines.bundle import METADATA_FILE
from pipelines.config import Paths, load_settings
from pipelines.io import DamagedFile, read_json, write_json
from pipelines.registry import Registry, RegistryError, aliases_from_decisions
from pipelines.stages import collect, compress, deploy, prepare, promote, report, train, validate
from tests.conftest import write_params

WEAK = {"train.learners": ["lightgbm"], "train.lightgbm.n_estimators": 2, "train.lightgbm.num_leaves": 2}
# the registry's behaviour needs a champion and a weaker challenger, not good models: a tiny table, one learner,
# a few-tree student distilled on the training rows alone, its memory not measured and 20 single rows timed
TINY = {"source.simulator.rows_per_batch": 400, "train.learners": ["lightgbm"], "compress.augment_factor": 0,
        "compress.student.n_estimators": 10, "compress.measure_memory": False, "compress.latency_rows": 20}


def _fake_registry(root, versions, decisions):
    """A registry of metadata-only versions with a decision log (no aliases.json)."""
    registry = Registry(root / "models" / "registry")
    for version in versions:
        folder = registry.version_dir(version)
        folder.mkdir(parents=True)
        write_json(folder / METADATA_FILE, {"version": version})
    write_json(registry.root / "decisions.json", decisions)
    return registry


DECISIONS = [
    {"action": "gate", "challenger": "v1", "champion_before": None, "champion_after": "v1", "promoted": True},
    {"action": "gate", "challenger": "v2", "champion_before": "v1", "champion_after": "v2", "promoted": True},
    {"action": "gate", "challenger": "v3", "champion_before": "v2", "champion_after": "v3", "promoted": True},
    {"action": "rollback", "champion_before": "v3", "champion_after": "v2"},
    {"action": "gate", "challenger": "v4", "champion_before": "v2", "champion_after": "v2", "promoted": False},
    {"action": "force_promote", "champion_before": "v2", "champion_after": "v4"},
]


def test_lost_aliases_are_rebuilt_from_the_decision_log(tmp_path):
    registry = _fake_registry(tmp_path, ["v1", "v2", "v3", "v4"], DECISIONS)
    expected = {"champion": "v4", "challenger": "v4", "champion_history": ["v1", "v2"]}
    assert aliases_from_decisions(DECISIONS) == expected
    assert registry.aliases() == expected
    # the replay matches what the operations themselves leave behind
    assert registry_ops.rollback(Registry(Paths(tmp_path).registry)) == "v2"
    assert json.loads((registry.root / "aliases.json").read_text())["champion_history"] == ["v1"]
    (registry.root / "aliases.json").unlink()
    assert registry.aliases() == aliases_from_decisions(registry.decisions()) == {
        "champion": "v2", "challenger": "v4", "champion_history": ["v1"]}


def test_versions_without_any_state_stop_instead_of_a_first_champion(tmp_path):
    registry = _fake_registry(tmp_path, ["v1"], [])
    (registry.root / "decisions.json").unlink()
    with pytest.raises(RegistryError) as err:
        registry.champion  # noqa: B018
    message = str(err.value)
    assert "aliases.json" in message and "decisions.json" in message and "amaas promote --force --version" in message
    assert Registry(tmp_path / "empty").aliases()["champion"] is None  # a new registry is still a fresh start


def test_rollback_to_a_deleted_version_names_the_folder_and_the_fix(tmp_path):
    registry = _fake_registry(tmp_path, ["v1", "v2", "v3"], DECISIONS[:3])
    write_json(registry.root / "aliases.json", registry.aliases())
    (registry.version_dir("v2") / METADATA_FILE).unlink()
    with pytest.raises(RegistryError, match=r"cannot roll back to 'v2': its folder .*versions/v2 is gone.*"
                                            r"amaas promote --force --version"):
        registry_ops.rollback(Registry(Paths(tmp_path).registry))
    assert registry.champion == "v3"  # nothing changed


def test_deleted_champion_folder_is_a_clear_error(tmp_path):
    settings = load_settings(write_params(tmp_path))
    registry = _fake_registry(tmp_path, ["v1", "v2"], DECISIONS[:2])
    shutil.rmtree(registry.version_dir("v2"))
    with pytest.raises(RegistryError, match=r"champion 'v2': its folder .*versions/v2 is missing.*dvc checkout.*"
                                            r"--version v1"):
        deploy.run(settings, Paths(tmp_path))
    with pytest.raises(RegistryError, match="champion 'v2'"):
        registry.load("v2", "champion")
    with pytest.raises(RegistryError, match=r"champion 'v2': its folder"):  # monitoring the champion
        report.load_reference(settings, Paths(tmp_path))
    with pytest.raises(RegistryError, match=r"'v2': its folder"):  # batch scoring with it
        score.run(settings, Paths(tmp_path), tmp_path / "in.csv", tmp_path / "out.parquet")


@pytest.mark.parametrize("name", ["aliases.json", "decisions.json"])
def test_truncated_registry_json_names_the_file_and_the_fix(tmp_path, name):
    registry = _fake_registry(tmp_path, ["v1"], DECISIONS[:1])
    write_json(registry.root / "aliases.json", registry.aliases())
    file = registry.root / name
    file.write_text(file.read_text()[:20])
    with pytest.raises(DamagedFile, match=rf"{file} is not valid JSON .*restore it"):
        registry.aliases() if name == "aliases.json" else registry.decisions()


def test_read_json_names_the_file(tmp_path):
    file = tmp_path / "x.json"
    file.write_text('{"a": [1, 2')
    with pytest.raises(ValueError, match=rf"{file} is not valid JSON .*line 1.*rerun the stage"):
        read_json(file)


@pytest.mark.slow  # collect, validate, prepare, train, compress, promote, then train, compress and promote again
def test_lost_aliases_never_let_a_failed_challenger_through(tmp_path):
    settings = load_settings(write_params(tmp_path, **TINY))
    paths = Paths(tmp_path)
    for stage in (collect, validate, prepare, train, compress):
        stage.run(settings, paths)
    assert promote.run(settings, paths)["promoted"]
    registry = Registry(paths.registry)
    champion = registry.champion

    weak = load_settings(write_params(tmp_path, **{**TINY, **WEAK}))
    train.run(weak, paths)
    compress.run(weak, paths)
    failed = promote.run(weak, paths)
    assert not failed["promoted"] and registry.champion == champion

    (paths.registry / "aliases.json").unlink()  # state lost: the same challenger meets the gate again
    again = promote.run(weak, paths)
    assert not again["promoted"] and "fails the gate" in again["reason"], again["reason"]
    assert registry.champion == champion
    assert again["champion_before"] == champion

    (paths.registry / "aliases.json").unlink()
    (paths.registry / "decisions.json").unlink()
    with pytest.raises(RegistryError, match="amaas promote --force"):
        promote.run(weak, paths)
    assert not (paths.registry / "aliases.json").exists()


def test_aliases_that_disagree_with_the_decision_log_stop_the_gate(tmp_path):
    """Hardening II, item 2: aliases.json restored from a new registry (champion null) let the challenger in as a
    "first champion" although the log names a champion that had beaten it."""
    registry = _fake_registry(tmp_path, ["v1", "v2"], DECISIONS[:2])
    write_json(registry.root / "aliases.json", {"champion": None, "challenger": None, "champion_history": []})
    with pytest.raises(RegistryError, match=r"name champion None but the decision log leads to 'v2'.*delete .*"
                                            r"aliases.json.*amaas promote --force --version"):
        registry.checked_aliases()
    (registry.root / "aliases.json").unlink()  # the repair the message names
    assert registry.checked_aliases()["champion"] == "v2"


def test_a_promotion_killed_between_its_writes_keeps_its_decision(tmp_path, monkeypatch):
    """Hardening II, item 3: killed between the aliases write and the decisions write, a champion changed with no
    decision, and a rebuild from the log brought the old one back. The decision is written first now."""
    registry = _fake_registry(tmp_path, ["v1", "v2", "v3"], DECISIONS[:2])
    write_json(registry.root / "aliases.json", registry.aliases())
    from pipelines import registry as module

    real, calls = module.write_json, []

    def killed_after_first(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies before its second write
        real(path, data)

    monkeypatch.setattr(module, "write_json", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        registry_ops.force_promote(registry, "v3", "test")
    monkeypatch.setattr(module, "write_json", real)
    assert calls[0] == "decisions.json" and registry.decisions()[-1]["champion_after"] == "v3"
    with pytest.raises(RegistryError, match="disagrees with its history"):
        registry.checked_aliases()  # the gate decides nothing until the aliases are rebuilt
    (registry.root / "aliases.json").unlink()
    assert registry.champion == "v3"


@pytest.mark.parametrize("aliases", [{}, [], {"champion": 3, "challenger": None, "champion_history": []}])
def test_aliases_of_the_wrong_shape_name_the_file(tmp_path, aliases):
    """Hardening II, item 9: `{}` or `[]` in aliases.json ended in a traceback."""
    registry = _fake_registry(tmp_path, ["v1"], DECISIONS[:1])
    write_json(registry.root / "aliases.json", aliases)
    with pytest.raises(DamagedFile, match=r"aliases.json is not an object of champion.*delete it to rebuild it"):
        registry.champion  # noqa: B018


def test_a_decision_log_of_the_wrong_shape_is_not_appended_to(tmp_path):
    """Hardening II, item 9: an object in decisions.json was "appended to" and corrupted further."""
    registry = _fake_registry(tmp_path, ["v1"], DECISIONS[:1])
    write_json(registry.root / "aliases.json", registry.aliases())
    write_json(registry.root / "decisions.json", {"action": "gate"})
    with pytest.raises(DamagedFile, match="decisions.json is not a list of decisions"):
        registry.record({"action": "gate"})
    assert json.loads((registry.root / "decisions.json").read_text()) == {"action": "gate"}


def test_a_corrupt_model_file_names_the_version_and_the_fix(tmp_path):
    """Hardening II, item 9: a corrupt champion model file ended in the model library's traceback."""
    registry = _fake_registry(tmp_path, ["v1"], DECISIONS[:1])
    with pytest.raises(RegistryError, match=r"champion 'v1' does not load from .*amaas promote --force"):
        registry.load("v1", "champion")
