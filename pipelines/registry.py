"""Model registry under models/registry/: versions, champion/challenger aliases, decision log.

Layout: versions/<version>/ (a full model bundle, plus monitoring/: the sample of its training rows and
its test predictions that monitoring compares new data with), aliases.json, decisions.json. Every write
is atomic, so a crash never leaves an alias pointing at a half-copied version.
"""

from __future__ import annotations

import getpass
import logging
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.bundle import METADATA_FILE, ModelBundle
from pipelines.config import Paths
from pipelines.io import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)
MONITORING_DIR = "monitoring"  # inside a version: what monitoring compares new data with


class RegistryError(RuntimeError):
    """An operator action that cannot be carried out (no champion, nothing to roll back to...)."""


@dataclass(frozen=True)
class Registry:
    root: Path

    @property
    def _aliases_file(self) -> Path:
        return self.root / "aliases.json"

    @property
    def _decisions_file(self) -> Path:
        return self.root / "decisions.json"

    def version_dir(self, version: str) -> Path:
        return self.root / "versions" / version

    def versions(self) -> list[str]:
        folder = self.root / "versions"
        return sorted(p.name for p in folder.iterdir() if (p / METADATA_FILE).is_file()) if folder.is_dir() else []

    def aliases(self) -> dict[str, Any]:
        if not self._aliases_file.is_file():
            return {"champion": None, "challenger": None, "champion_history": []}
        return read_json(self._aliases_file)

    @property
    def champion(self) -> str | None:
        return self.aliases()["champion"]

    def load(self, version: str) -> ModelBundle:
        if version not in self.versions():
            raise RegistryError(f"model version {version!r} is not in the registry at {self.root}")
        return ModelBundle.load(self.version_dir(version))

    def register(self, bundle_dir: Path, extra: dict[str, Any] | None = None,
                 monitoring: dict[str, Path] | None = None) -> str:
        """Copy a bundle into versions/<version>/ (once) and mark it as the challenger.

        `extra` is merged into its metadata; `monitoring` files (name -> source) go into monitoring/."""
        version = str(read_json(bundle_dir / METADATA_FILE)["version"])
        target = self.version_dir(version)
        if not (target / METADATA_FILE).is_file():
            with atomic_dir(target) as tmp:
                shutil.copytree(bundle_dir, tmp, dirs_exist_ok=True)
                if extra:
                    write_json(tmp / METADATA_FILE, {**read_json(tmp / METADATA_FILE), **extra})
                for name, source in (monitoring or {}).items():
                    (tmp / MONITORING_DIR).mkdir(exist_ok=True)
                    shutil.copy2(source, tmp / MONITORING_DIR / name)
        self._set_aliases(challenger=version)
        return version

    def set_champion(self, version: str) -> None:
        if version not in self.versions():
            raise RegistryError(f"cannot make {version!r} champion: it is not registered")
        aliases = self.aliases()
        if aliases["champion"] == version:
            return
        history = [*aliases["champion_history"], aliases["champion"]] if aliases["champion"] else []
        self._set_aliases(champion=version, champion_history=history)

    def rollback(self) -> tuple[str, str]:
        """Make the previous champion champion again; return (from, to)."""
        aliases = self.aliases()
        if not aliases["champion_history"]:
            raise RegistryError("nothing to roll back to: there has been only one champion (or none)")
        *history, previous = aliases["champion_history"]
        self._set_aliases(champion=previous, champion_history=history)
        return aliases["champion"], previous

    def decisions(self) -> list[dict[str, Any]]:
        return read_json(self._decisions_file) if self._decisions_file.is_file() else []

    def record(self, decision: dict[str, Any]) -> None:
        write_json(self._decisions_file, [*self.decisions(), decision])

    def _set_aliases(self, **changes: Any) -> None:
        write_json(self._aliases_file, {**self.aliases(), **changes})


def _operator_record(action: str, **fields: Any) -> dict[str, Any]:
    return {"action": action, "by": getpass.getuser(), "at": datetime.now(UTC).isoformat(timespec="seconds"), **fields}


def force_promote(paths: Paths, version: str | None = None, reason: str = "") -> str:
    """Operator override: make `version` (default: the current challenger) champion, gate skipped."""
    registry = Registry(paths.registry)
    target = version or registry.aliases()["challenger"]
    if target is None:
        raise ValueError("no challenger registered: run the pipeline first or pass --version")
    before = registry.champion
    registry.set_champion(target)
    registry.record(_operator_record("force_promote", champion_before=before, champion_after=target, reason=reason))
    log.warning("operator forced %s to champion (was %s)", target, before)
    return target


def rollback(paths: Paths, reason: str = "") -> str:
    """Operator action: return to the previous champion."""
    registry = Registry(paths.registry)
    before, after = registry.rollback()
    registry.record(_operator_record("rollback", champion_before=before, champion_after=after, reason=reason))
    log.warning("operator rolled back champion %s -> %s", before, after)
    return after
