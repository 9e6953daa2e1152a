"""Supply chain: the hashed locks agree with the pins, the image keeps secrets and local state out and does not
run as root, and every install checks hashes."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCKS = [ROOT / "requirements.lock", ROOT / "infra" / "requirements-image.lock"]
# what must never reach the image: secrets (infra/.env, .amaas/ API key hashes), the prediction log, local state
SECRET_OR_STATE = ["infra/.env", ".amaas/api_keys.json", "logs/predictions/2026-01-01.jsonl", ".venv/bin/python",
                   "data/raw/table.parquet", "data/features/train.parquet", "models/registry.json",
                   ".airflow/airflow.db", ".bentoml/bentos/x/bento.yaml", ".dvc-storage/files/md5/ab/cd",
                   ".dvc/cache/files/md5/ab/cd", ".dvc/config.local", ".amaas.lock"]
# what the image needs: the code, the pipeline's definition and settings
PROJECT = ["pyproject.toml", "README.md", "pipelines/cli.py", "dags/training_pipeline.py", "bentos/service.py",
           "dvc.yaml", "params.yaml", ".dvc/config", "data/README.md", "reports/metrics.json", "expectations/x.json"]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _entries(lock: Path) -> list[tuple[Requirement, list[str]]]:
    """(requirement, its hashes) for every entry of a requirements file with `\\` continuations."""
    text = re.sub(r"\\\n", " ", lock.read_text())
    entries = []
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-"), f"{lock.name}: an option line ({line[:60]}) widens where files come from"
        spec, *options = re.split(r"\s+--", line)
        hashes = [o.split("=", 1)[1] for o in options if o.startswith("hash=")]
        entries.append((Requirement(spec), hashes))
    return entries


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_every_lock_entry_is_exact_and_hashed(lock: Path) -> None:
    entries = _entries(lock)
    assert len(entries) > 200
    for req, hashes in entries:
        assert [s.operator for s in req.specifier] == ["=="], f"{req} is not pinned with =="
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), f"{req} has no sha256"


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_lock_versions_are_the_pins(lock: Path) -> None:
    """Every version in the lock is the one constraints.txt pins; an entry constraints.txt lacks is only for
    another platform or Python (its marker is false here: Linux, CPython 3.11)."""
    pins = _pins()
    for req, _ in _entries(lock):
        name, version = canonicalize_name(req.name), next(iter(req.specifier)).version
        if name in pins:
            assert version == pins[name], f"{lock.name}: {name}=={version}, constraints.txt pins {pins[name]}"
        elif lock.name == "requirements.lock":
            assert req.marker is not None and not req.marker.evaluate(
                {"sys_platform": "linux", "platform_system": "Linux", "python_full_version": "3.11.7",
                 "python_version": "3.11", "implementation_name": "cpython"}), f"{req} is not in constraints.txt"


def test_the_dev_lock_covers_every_pin() -> None:
    locked = {canonicalize_name(req.name) for req, _ in _entries(LOCKS[0])}
    assert set(_pins()) <= locked, sorted(set(_pins()) - locked)
    assert {"pip", "setuptools"} <= locked  # the venv's own installers are checked too


def test_the_image_lock_pins_dvc_s3_and_the_cpu_torch() -> None:
    locked = {canonicalize_name(req.name): next(iter(req.specifier)).version for req, _ in _entries(LOCKS[1])}
    wanted = [Requirement(line) for line in (ROOT / "infra" / "requirements-image.in").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for req in wanted:
        assert canonicalize_name(req.name) in locked, req
        assert not req.specifier or locked[canonicalize_name(req.name)] in req.specifier, req
    assert locked["torch"].endswith("+cpu")
    assert "pytest" not in locked and "mypy" not in locked  # the image has the runtime only


def test_installs_check_hashes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    install = makefile.split("$(VENV)/.installed:")[1].split("\n\n")[0]
    pip_lines = [line for line in install.splitlines() if "pip install" in line]
    assert "--require-hashes -r requirements.lock" in install.replace("--no-deps ", "")
    assert all("--require-hashes" in line or "--no-deps" in line for line in pip_lines), pip_lines
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    for run in re.findall(r"^RUN .*?(?<!\\)$", dockerfile, re.MULTILINE | re.DOTALL):
        for command in re.split(r"&&|;", run):
            if "pip install" in command:
                assert "--require-hashes" in command or "--no-deps" in command, command


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    ignored = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        forms = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, f) for c in candidates for f in forms):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_secrets_and_state_out_of_the_image() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert [p for p in SECRET_OR_STATE if not _dockerignored(p, patterns)] == []
    assert [p for p in PROJECT if _dockerignored(p, patterns)] == []


def test_image_does_not_run_as_root() -> None:
    lines = [line.strip() for line in (ROOT / "infra" / "Dockerfile").read_text().splitlines()]
    last_from = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    users = [line.split()[1] for line in lines[last_from:] if line.startswith("USER ")]
    assert users, "no USER: the image runs as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_images_are_pinned() -> None:
    """Base and service images name an exact release (MinIO's: RELEASE.<date>) or a digest, never a moving tag
    like latest or 15."""
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    compose = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())
    images = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    images += [s["image"] for s in compose["services"].values()
               if "image" in s and "build" not in s and not s["image"].startswith("$")]
    assert images
    for image in images:
        name, _, tag = image.partition("@")[0].rpartition(":")
        exact = re.search(r"\d+\.\d+|RELEASE\.\d{4}-", tag)
        assert "@sha256:" in image or (name and exact), f"{image} is not an exact release"



def test_every_package_the_code_imports_is_declared() -> None:
    """Hardening II, item 16: pipelines/progress.py imported tqdm, which arrived only through another package."""
    import ast
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    from importlib.metadata import requires

    declared = set()
    for spec in map(Requirement, project["dependencies"]):
        declared.add(canonicalize_name(spec.name))
        for extra in spec.extras:  # dask[distributed] declares distributed
            for dep in map(Requirement, requires(spec.name) or []):
                if dep.marker is not None and dep.marker.evaluate({"extra": extra}):
                    declared.add(canonicalize_name(dep.name))
    providers = packages_distributions()
    ours = {"pipelines", "bentos", "dags", "tests", "_project", "serve"}
    missing = {}
    for folder in ("pipelines", "bentos", "dags"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                for name in names:
                    top = name.split(".")[0]
                    if top in ours or top in sys.stdlib_module_names:
                        continue
                    dists = {canonicalize_name(d) for d in providers.get(top, [])}
                    if not dists & declared:
                        missing.setdefault(top, str(path.relative_to(ROOT)))
    assert not missing, f"imported but not declared in pyproject.toml's dependencies: {missing}"
