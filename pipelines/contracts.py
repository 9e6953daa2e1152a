"""Stage contracts: what each stage reads and writes, declared once beside its `run`.

A stage module decorates its `run` with `@stage(...)`: the settings keys it reads (dotted, as in
params.yaml), its inputs and outputs (names of `Paths` properties, so each file name is spelled once) and
any code outside its imports. From these follow:
- the settings it receives: a `SettingsView` that raises `UndeclaredSetting` on any key not declared, so a
  read the declaration forgot fails in every test and every run instead of leaving a stale result;
- its code dependencies: the stage module and every `pipelines` module it imports, transitively;
- dvc.yaml (`amaas dvc-yaml` writes it, a test checks it is current), so an edit to a param or to the code
  reruns exactly the stages that read it, and nothing else.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml
from pydantic import BaseModel

from pipelines.config import Paths, Settings

CODE_ROOT = Path(__file__).resolve().parent.parent
F = TypeVar("F", bound=Callable[..., Any])


class UndeclaredSetting(AttributeError):
    """A stage read a setting its declaration does not list."""


@dataclass(frozen=True)
class Out:
    """An output of a stage: a `Paths` property, and how DVC keeps it."""

    path: str
    cache: bool = True
    persist: bool = False  # DVC must not delete it before the stage runs (it accumulates across runs)


@dataclass(frozen=True)
class Plot:
    """A plot file of a stage (a `Paths` property) and how `dvc plots` draws it."""

    path: str
    x: str
    y: str
    title: str
    template: str | None = None


@dataclass(frozen=True)
class Option:
    """A command-line option of a stage (`amaas <stage> --flag`), given to its run() as keyword `dest`."""

    flag: str
    help: str
    metavar: str | None = None
    switch: bool = False  # a flag without a value (store_true)
    default: Any = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Stage:
    """One stage's contract (see the module docstring)."""

    name: str
    params: tuple[str, ...]  # settings keys that change its outputs: in dvc.yaml, rerun on change
    deps: tuple[str, ...] = ()  # input files: `Paths` properties
    outs: tuple[Out, ...] = ()
    metrics: tuple[str, ...] = ()  # `Paths` properties of JSON metrics files (git-tracked, not cached)
    plots: tuple[Plot, ...] = ()
    plots_dir: str | None = None  # a `Paths` property: the folder the plots are written in (an output)
    runtime: tuple[str, ...] = ()  # settings it reads that never change its outputs (alerting): not in dvc.yaml
    extra_code: tuple[str, ...] = ()  # code it depends on beyond its imports (files or folders of the repository)
    options: tuple[Option, ...] = ()  # command-line options of `amaas <stage>`
    always_changed: bool = False
    description: str = ""
    # the stage replaces each of its outputs (outs, plots_dir, metrics) atomically itself: DVC keeps them in place
    # while it runs (persist), so a killed `dvc repro` leaves the old outputs, never none; DVC's run cache is off
    # for a stage with a persisted output (it still caches, commits and checks out the outputs)
    atomic_outs: bool = False

    @property
    def reads(self) -> tuple[str, ...]:
        return (*self.params, *self.runtime)

    @property
    def module(self) -> str:
        return f"pipelines.stages.{self.name}"

    def settings_for(self, settings: Settings) -> Settings:
        """`settings` as this stage may see them: declared keys only."""
        if isinstance(settings, SettingsView):
            settings = object.__getattribute__(settings, "_obj")
        return cast(Settings, SettingsView(settings, "", self.reads, self.name))


def stage(params: Iterable[str], **contract: Any) -> Callable[[F], F]:
    """Declare the decorated `run` a stage of the module's name; it then sees only the declared settings."""

    def declare(run: F) -> F:
        name = run.__module__.rsplit(".", 1)[-1]
        declared = Stage(name=name, params=tuple(params), **contract)

        @functools.wraps(run)
        def restricted(settings: Settings, paths: Paths, *args: Any, **kwargs: Any) -> Any:
            return run(declared.settings_for(settings), paths, *args, **kwargs)

        restricted.stage = declared  # type: ignore[attr-defined]
        return cast(F, restricted)

    return declare


def declaration(name: str) -> Stage:
    """The contract of stage `name` (imports its module)."""
    module = importlib.import_module(f"pipelines.stages.{name}")
    declared: Stage = module.run.stage
    return declared


def _covers(declared: Iterable[str], key: str) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def _above(declared: Iterable[str], key: str) -> bool:
    return any(d.startswith(key + ".") for d in declared)


class SettingsView:
    """Read-only settings that answer only the declared keys; anything else raises UndeclaredSetting.

    A declared key gives the real value (a whole section when the key is a section); a section above a
    declared key gives a view of it. Properties (`data_schema`, `watermark_column`, `columns`...) run on the
    view, so what they read is checked too."""

    __slots__ = ("_obj", "_prefix", "_keys", "_stage")

    def __init__(self, obj: BaseModel, prefix: str, keys: tuple[str, ...], stage: str) -> None:
        for name, value in (("_obj", obj), ("_prefix", prefix), ("_keys", keys), ("_stage", stage)):
            object.__setattr__(self, name, value)

    def __getattr__(self, attr: str) -> Any:
        obj: BaseModel = object.__getattribute__(self, "_obj")
        prefix: str = object.__getattribute__(self, "_prefix")
        keys: tuple[str, ...] = object.__getattribute__(self, "_keys")
        fields = type(obj).model_fields
        if attr in fields:
            key = prefix + (fields[attr].alias or attr)
            value = getattr(obj, attr)
            if _covers(keys, key):
                return value
            if _above(keys, key) and isinstance(value, BaseModel):
                return SettingsView(value, key + ".", keys, object.__getattribute__(self, "_stage"))
            raise self._undeclared(key)
        found = inspect.getattr_static(type(obj), attr, None)
        if isinstance(found, property) and found.fget is not None:
            return found.fget(self)  # the property's own reads go through the view
        raise self._undeclared(prefix + attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        raise AttributeError("settings are read-only")

    def __repr__(self) -> str:
        keys = ", ".join(object.__getattribute__(self, "_keys"))
        return f"SettingsView({object.__getattribute__(self, '_stage')}: {keys})"

    def _undeclared(self, key: str) -> UndeclaredSetting:
        name = object.__getattribute__(self, "_stage")
        return UndeclaredSetting(f"stage {name} read setting {key!r}, which its declaration does not list: add it "
                                 f"to @stage(params=...) in pipelines/stages/{name}.py, then run `amaas dvc-yaml`")


def code_dependencies(stage: Stage) -> list[str]:
    """The stage module and every `pipelines` module it imports (at any depth, inside functions too), plus
    its extra code, as repository-relative paths; a folder declared covers the files in it."""
    seen: set[str] = set()
    todo = [stage.module]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(_imports(module))
    files = sorted(f for m in seen if (f := _source(m)) is not None)
    folders = [f.rstrip("/") for f in stage.extra_code]
    kept = [f for f in files if not any(f == d or f.startswith(d + "/") for d in folders)]
    return sorted({*kept, *folders})


@functools.cache
def _source(module: str) -> str | None:
    """The file of a `pipelines` module (found on disk, nothing imported), or None if it is not one."""
    base = CODE_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(CODE_ROOT).as_posix()
    return None


@functools.cache
def _imports(module: str) -> tuple[str, ...]:
    """The `pipelines` modules `module` imports; importing a.b.c runs a/__init__ and a/b/__init__ too.
    The declaration machinery (this module) is left out: it changes no output, it only checks reads."""
    origin = _source(module)
    if origin is None:
        return ()
    package = module if origin.endswith("__init__.py") else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse((CODE_ROOT / origin).read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        for name in names:
            parts = name.split(".")
            if parts[0] != "pipelines":
                continue
            found |= {m for i in range(1, len(parts) + 1) if _source(m := ".".join(parts[:i])) is not None}
    return tuple(sorted(found - {module, __name__}))


def dvc_stage(stage: Stage, paths: Paths) -> dict[str, Any]:
    """The dvc.yaml entry of a stage."""

    def rel(name: str) -> str:
        value = getattr(paths, name)
        if not isinstance(value, Path):
            raise TypeError(f"stage {stage.name}: {name!r} is not a Paths property")
        return value.relative_to(paths.root).as_posix()

    entry: dict[str, Any] = {"cmd": f"amaas {stage.name}"}
    if stage.description:
        entry["desc"] = stage.description
    entry["deps"] = [*(rel(d) for d in stage.deps), *code_dependencies(stage)]
    if stage.params:
        entry["params"] = sorted(stage.params)
    if stage.always_changed:
        entry["always_changed"] = True
    outs: list[Any] = []
    kept = {"persist": True} if stage.atomic_outs else {}
    for out in stage.outs:
        options = {k: v for k, v in (("cache", out.cache), ("persist", out.persist)) if v != getattr(Out, k)} | kept
        outs.append({rel(out.path): options} if options else rel(out.path))
    if stage.plots_dir:
        outs.append({rel(stage.plots_dir): {"cache": False, **kept}})
    if outs:
        entry["outs"] = outs
    if stage.metrics:
        entry["metrics"] = [{rel(m): {"cache": False, **kept}} for m in stage.metrics]
    return entry


HEADER = """\
# GENERATED by `amaas dvc-yaml` from the stage declarations (@stage in pipelines/stages/*.py): edit those and
# rerun it; tests/unit/test_stage_contracts.py fails when this file differs from what they declare.
# Each stage runs `amaas <stage>`, the same function Airflow and the CLI call. deps: its inputs, its module
# and every pipelines module it imports; params: every settings key it reads that can change its outputs.
"""


def dvc_yaml(stages: Iterable[Stage], paths: Paths) -> str:
    """The text of dvc.yaml for `stages` in order."""
    declared = list(stages)
    document: dict[str, Any] = {"stages": {s.name: dvc_stage(s, paths) for s in declared}}
    plots = []
    for s in declared:
        for plot in s.plots:
            spec = {"x": plot.x, "y": plot.y, "title": plot.title}
            if plot.template:
                spec = {"template": plot.template, **spec}
            plots.append({getattr(paths, plot.path).relative_to(paths.root).as_posix(): spec})
    if plots:
        document["plots"] = plots
    return HEADER + yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=118)
