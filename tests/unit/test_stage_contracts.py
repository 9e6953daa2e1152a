"""The stage declarations are the one source: dvc.yaml is generated from them, the DAGs follow STAGES, a stage
reads only what it declares, an edit to a param or to a stage's code marks exactly the stages that use it, and
no stage module imports another."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.config import Paths, load_settings
from pipelines.contracts import Stage, UndeclaredSetting, _imports, code_dependencies, stage
from pipelines.runner import STAGES, declarations, write_dvc_yaml
from tests.conftest import BIN, REPO, get_dotted, set_dotted, write_params

DECLARED = {s.name: s for s in declarations()}


def test_dvc_yaml_is_generated_from_the_declarations():
    assert write_dvc_yaml(REPO, check=True), "dvc.yaml is out of date: run `amaas dvc-yaml` and commit it"
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert tuple(stages) == STAGES == tuple(DECLARED)
    assert all(spec["cmd"] == f"amaas {name}" for name, spec in stages.items())


def test_no_stage_module_imports_another():
    for name in STAGES:
        others = {m for m in _imports(f"pipelines.stages.{name}") if m.startswith("pipelines.stages.")}
        assert not others, f"stage {name} imports {others}: move what they share into a building block"


def test_every_declared_path_is_a_path_of_the_project():
    paths = Paths(Path("/project"))
    for declared in DECLARED.values():
        names = [*declared.deps, *(o.path for o in declared.outs), *declared.metrics,
                 *(p.path for p in declared.plots), *([declared.plots_dir] if declared.plots_dir else [])]
        for name in names:
            assert isinstance(getattr(paths, name), Path), f"{declared.name}: {name}"


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return load_settings(write_params(tmp_path_factory.mktemp("params")))


def test_a_stage_sees_only_the_settings_it_declares(settings):
    prepare = DECLARED["prepare"].settings_for(settings)
    assert prepare.report.reference_rows == settings.report.reference_rows  # declared: report.reference_rows
    assert prepare.data_schema == settings.data_schema  # a declared section comes whole, properties included
    with pytest.raises(UndeclaredSetting, match=r"stage prepare read setting 'report.drift_share_threshold'"):
        _ = prepare.report.drift_share_threshold
    with pytest.raises(UndeclaredSetting, match="'train'"):
        _ = prepare.train
    # a property reads through the view: its own reads are checked
    narrow = Stage("promote", params=("schema.target",)).settings_for(settings)
    assert narrow.data_schema.target == settings.data_schema.target
    with pytest.raises(UndeclaredSetting, match="schema.id_column"):
        _ = narrow.data_schema.columns
    collect = DECLARED["collect"].settings_for(settings)
    assert collect.watermark_column == settings.watermark_column
    with pytest.raises(AttributeError):
        collect.seed = 1  # type: ignore[misc]


def test_a_stage_run_gets_the_view_whatever_calls_it(settings):
    """The decorator restricts the settings, so tests and orchestrators calling run() directly are checked too."""
    seen = {}

    @stage(params=("seed",))
    def run(settings, paths):
        seen["seed"] = settings.seed
        return settings.train  # not declared

    with pytest.raises(UndeclaredSetting, match="'train'"):
        run(settings, None)
    assert seen == {"seed": settings.seed}
    assert run.stage.params == ("seed",)


def test_code_dependencies_follow_imports():
    train = code_dependencies(DECLARED["train"])
    assert {"pipelines/stages/train.py", "pipelines/tuning.py", "pipelines/models/gbm.py"} <= set(train)
    assert "pipelines/contracts.py" not in train  # the declaration machinery changes no output
    assert not any(f.startswith("pipelines/stages/") and f != "pipelines/stages/train.py" for f in train
                   if f != "pipelines/stages/__init__.py")
    assert "pipelines/tuning.py" not in code_dependencies(DECLARED["prepare"])


# --- dvc status on a project whose outputs are all committed: an edit marks exactly the stages that use it ---

def _leaf(params: dict[str, Any], key: str) -> str:
    """A scalar key at or under `key` (the first one), to change."""
    node = get_dotted(params, key)
    while isinstance(node, dict) and node:
        first = next(iter(node))
        key, node = f"{key}.{first}", node[first]
    return key


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, list):
        return [*value, value[-1]] if value else [1]
    return f"{value}x" if isinstance(value, str) else 1


@pytest.fixture(scope="module")
def committed_project(tmp_path_factory):
    """A DVC project with the repository's dvc.yaml, code and params, and a placeholder for every output,
    committed (`dvc commit`), so `dvc status` says exactly what an edit invalidates."""
    root = tmp_path_factory.mktemp("dvc")
    for folder in ("pipelines", "bentos", "expectations"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy2(REPO / name, root / name)
    write_params(root)
    paths = Paths(root)
    for declared in DECLARED.values():
        for name in [*(o.path for o in declared.outs), *declared.metrics, declared.plots_dir]:
            if not name:
                continue
            target: Path = getattr(paths, name)
            if target.suffix:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("{}")
            else:
                target.mkdir(parents=True, exist_ok=True)
                (target / "placeholder").write_text(name)
    paths.registry_aliases.write_text("{}")
    dvc = str(BIN / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=root, check=True)
    done = subprocess.run([dvc, "commit", "-f", "-q"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return root


def _status(root: Path) -> set[str]:
    """The stages `dvc status` marks changed (collect asks the source on every repro: left out)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        changed = repo.status()
    return {name.split(":")[-1] for name, changes in changed.items() if changes != ["always changed"]}


@pytest.fixture(scope="module")
def params_status(committed_project):
    """The stages whose params `dvc status` finds changed: DVC's own ParamsDependency check, with params.yaml
    parsed once per edit instead of once per stage (ruamel takes 0.3 s a parse; the code deps are hashed
    by the full `dvc status` above)."""
    import copy

    from dvc.dependency import param
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    original, parsed = param.load_path, {}

    def load_path(path, fs, **kwargs):
        key = (path, fs.cat_file(path))
        if key not in parsed:
            parsed[key] = original(path, fs, **kwargs)
        return copy.deepcopy(parsed[key])

    param.load_path = load_path
    repo = Repo(str(committed_project))
    deps = [(s.name, d) for s in repo.index.stages for d in s.deps if isinstance(d, ParamsDependency)]
    yield lambda: {name for name, dep in deps if dep.status()}
    repo.close()
    param.load_path = original


def _stages_reading(key: str) -> set[str]:
    return {s.name for s in DECLARED.values() if any(key == p or key.startswith(p + ".") for p in s.params)}


def test_nothing_is_stale_after_commit(committed_project):
    assert _status(committed_project) == set()


@contextlib.contextmanager
def _edited(project: Path, key: str) -> Iterator[None]:
    """params.yaml of `project` with the value at dotted `key` changed, restored afterwards."""
    file = project / "params.yaml"
    before = file.read_text()
    params = yaml.safe_load(before)
    set_dotted(params, key, _changed(get_dotted(params, key)))
    file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        yield
    finally:
        file.write_text(before)


@pytest.mark.parametrize("key", sorted({p for s in DECLARED.values() for p in s.params}))
def test_a_param_edit_marks_exactly_the_stages_that_read_it(committed_project, params_status, key):
    leaf = _leaf(yaml.safe_load((committed_project / "params.yaml").read_text()), key)
    with _edited(committed_project, leaf):
        assert params_status() == _stages_reading(leaf), leaf


@pytest.mark.parametrize(("key", "stage"), [("seed", "prepare"), ("report.reference_rows", "prepare"),
                                            ("promote.bootstrap_samples", "report")])
def test_stale_results_found_in_review_are_rerun(committed_project, params_status, key, stage):
    """Each of these edits left a stale result before the declarations (dvc.yaml lists were copied by hand)."""
    with _edited(committed_project, key):
        assert stage in params_status()


def test_an_edit_to_the_search_retrains(committed_project):
    """pipelines/tuning.py was missing from train's deps: editing the search did not retrain."""
    tuning = committed_project / "pipelines" / "tuning.py"
    before = tuning.read_text()
    tuning.write_text(before + "\n# a change to the search\n")
    try:
        assert _status(committed_project) == {"train", "package"}  # package: the bento carries all the code
    finally:
        tuning.write_text(before)


def test_metrics_and_plots_are_committed_with_dvc_lock_and_the_rest_is_ignored(tmp_path):
    """`dvc exp run` keeps only what git or DVC tracks: metrics and plots (not cached) must not be git-ignored,
    or every experiment shows `!` for them; the other uncached outputs (HTML, registry) stay out of git."""
    paths = Paths(tmp_path)
    shutil.copy2(REPO / ".gitignore", tmp_path / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    tracked = [getattr(paths, m) for s in DECLARED.values() for m in s.metrics]
    tracked += [getattr(paths, p.path) for s in DECLARED.values() for p in s.plots]
    ignored = [getattr(paths, o.path) for s in DECLARED.values() for o in s.outs if not o.cache]

    def is_ignored(path: Path) -> bool:
        rel = path.relative_to(tmp_path).as_posix()
        return subprocess.run(["git", "check-ignore", "-q", rel], cwd=tmp_path).returncode == 0

    assert [p for p in tracked if is_ignored(p)] == []
    assert [p for p in ignored if not is_ignored(p)] == []
