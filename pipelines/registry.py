"""Model registry under models/registry/: versions, champion/challenger aliases, decision log.

Layout: versions/<version>/ (a full model bundle, plus monitoring/: the sample of its training rows and
its test predictions that monitoring compares new data with), aliases.json, decisions.json. Every write
is atomic, so a crash never leaves an alias pointing at a half-copied version.

Damage is told from a fresh start: a registry without aliases.json is new only if it holds no version and
no decision. A lost aliases.json is rebuilt from decisions.json (every change of champion is recorded
there); with versions but no decision log the registry stops with an error instead of crowning anyone, so
a missing file never lets a challenger past the gate as a "first champion".
"""

from __future__ import annotations

import getpass
import logging
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.bundle import METADATA_FILE, ModelBundle
from pipelines.config import Paths, Settings
from pipelines.io import DamagedFile, atomic_dir, read_json, write_json
from pipelines.state import shared

if TYPE_CHECKING:
    from pipelines.state.postgres import PgRegistry

log = logging.getLogger(__name__)
MONITORING_DIR = "monitoring"  # inside a version: what monitoring compares new data with


class RegistryError(RuntimeError):
    """An operator action that cannot be carried out (no champion, nothing to roll back to...)."""


@dataclass(frozen=True)
class Registry:
    """The registry under `root`; with `store` (a fleet's state database) its aliases and decisions live there,
    shared by every replica and host, and each change of champion is one transaction with its decision."""

    root: Path
    store: PgRegistry | None = None

    @classmethod
    def of(cls, paths: Paths, settings: Settings) -> Registry:
        """The project's registry, its aliases and decisions where `settings.state` puts them."""
        return cls(paths.registry, shared(settings, paths).registry_store)

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
        if self.store is not None:
            found = self.store.aliases()
            if found is not None:
                return found
            if not (self._aliases_file.is_file() or self._decisions_file.is_file()):
                return {"champion": None, "challenger": None, "champion_history": []}
            # a one-host project moving to the fleet: its registry's state goes to the database once
            self.store.seed(self._file_aliases(), self._file_decisions())
            log.warning("the registry's aliases and decisions were copied from %s into the state database; they are "
                        "kept there from now on", self.root)
            found = self.store.aliases()
            assert found is not None
            return found
        return self._file_aliases()

    def _file_aliases(self) -> dict[str, Any]:
        if self._aliases_file.is_file():
            aliases = read_json(self._aliases_file, fix=self._aliases_fix())
            if not (isinstance(aliases, dict) and {"champion", "challenger", "champion_history"} <= set(aliases)
                    and all(v is None or isinstance(v, str) for v in (aliases["champion"], aliases["challenger"]))
                    and isinstance(aliases["champion_history"], list)):
                raise DamagedFile(f"{self._aliases_file} is not an object of champion, challenger and "
                                  f"champion_history: {self._aliases_fix()}")
            return aliases
        decisions = self._file_decisions()
        if decisions:
            rebuilt = aliases_from_decisions(decisions)
            log.warning("%s is missing: rebuilt from %s (champion %s, challenger %s)", self._aliases_file,
                        self._decisions_file, rebuilt["champion"], rebuilt["challenger"])
            return rebuilt
        if self.versions():
            raise RegistryError(f"{self._aliases_file} and {self._decisions_file} are missing but "
                                f"{self.root / 'versions'} holds {', '.join(self.versions())}: the registry's state "
                                f"is lost, so the gate crowns no champion. Restore both files (`dvc checkout`, a "
                                f"backup), or name the champion by hand: `amaas promote --force --version V "
                                f"--reason \"...\"`")
        return {"champion": None, "challenger": None, "champion_history": []}

    def checked_aliases(self) -> dict[str, Any]:
        """The aliases, after checking that the champion is the one the decision log leads to: a restored or
        edited aliases.json (champion null, an older champion) must not let a challenger past the gate as a
        "first champion" or past a champion that had beaten it. RegistryError names the repair."""
        aliases = self.aliases()
        decisions = self.decisions()
        if decisions and (logged := aliases_from_decisions(decisions)["champion"]) != aliases["champion"]:
            where = "the state database's aliases" if self.store is not None else str(self._aliases_file)
            repair = ("name the champion by hand" if self.store is not None else
                      f"delete {self._aliases_file} to rebuild it from the log, or name the champion by hand")
            raise RegistryError(f"{where} name champion {aliases['champion']!r} but the decision log leads to "
                                f"{logged!r}: the gate does not decide against a registry that disagrees with its "
                                f"history; {repair}: `amaas promote --force --version V --reason \"...\"`")
        return aliases

    def _aliases_fix(self) -> str:
        return (f"restore it (`dvc checkout`, a backup), or delete it to rebuild it from {self._decisions_file}")

    @property
    def champion(self) -> str | None:
        champion: str | None = self.aliases()["champion"]
        return champion

    def champion_dir(self) -> Path:
        """The folder of the champion; RegistryError when there is none or its folder is gone."""
        champion = self.champion
        if champion is None:
            raise RegistryError("no champion yet: run the pipeline up to `amaas promote` first")
        return self._existing(champion, "champion")

    def _existing(self, version: str, role: str) -> Path:
        folder = self.version_dir(version)
        if not (folder / METADATA_FILE).is_file():
            others = [v for v in self.versions() if v != version]
            choose = (f"or make another version champion: `amaas promote --force --version {others[-1]} --reason "
                      f"\"...\"` (registered: {', '.join(others)})") if others else "or rerun the pipeline"
            raise RegistryError(f"{role} {version!r}: its folder {folder} is missing or incomplete (no "
                                f"{METADATA_FILE}): restore it (`dvc checkout`, a backup), {choose}")
        return folder

    def load(self, version: str, role: str = "model version") -> ModelBundle:
        folder = self._existing(version, role)
        try:
            return ModelBundle.load(folder)
        except Exception as exc:  # a damaged model file: each library fails in its own words
            raise RegistryError(f"{role} {version!r} does not load from {folder} ({type(exc).__name__}: "
                                f"{str(exc)[:200]}): restore the folder (`dvc checkout`, a backup), or make another "
                                f"version champion with `amaas promote --force --version V --reason \"...\"`"
                                ) from exc

    def register(self, bundle_dir: Path, extra: dict[str, Any] | None = None,
                 monitoring: dict[str, Path] | None = None) -> str:
        """Copy a bundle into versions/<version>/ (once) and mark it as the challenger.

        `extra` is merged into its metadata; `monitoring` files (name -> source) go into monitoring/."""
        version = str(read_json(bundle_dir / METADATA_FILE)["version"])
        aliases = self.aliases()  # a damaged registry stops here, before anything is added to it
        if self.store is None and not self._aliases_file.is_file():  # a new registry: its state exists first
            write_json(self._aliases_file, aliases)
        target = self.version_dir(version)
        if not (target / METADATA_FILE).is_file():
            with atomic_dir(target) as tmp:
                shutil.copytree(bundle_dir, tmp, dirs_exist_ok=True)
                if extra:
                    write_json(tmp / METADATA_FILE, {**read_json(tmp / METADATA_FILE), **extra})
                for name, source in (monitoring or {}).items():
                    (tmp / MONITORING_DIR).mkdir(exist_ok=True)
                    shutil.copy2(source, tmp / MONITORING_DIR / name)
        if self.store is not None:
            self.store.put_version(version, read_json(target / METADATA_FILE))
        self._set_aliases(challenger=version)
        return version

    def set_champion(self, version: str, decision: dict[str, Any] | None = None) -> None:
        """Make `version` champion and record `decision` (its `champion_after` filled in) with it: in the state
        database one transaction; in files the aliases first (aliases.json is rebuilt from the decisions)."""
        if version not in self.versions():
            raise RegistryError(f"cannot make {version!r} champion: it is not registered")
        aliases = self.aliases()
        history = [*aliases["champion_history"], aliases["champion"]] if aliases["champion"] else []
        changes = {} if aliases["champion"] == version else {"champion": version, "champion_history": history}
        self._change(changes, None if decision is None else {**decision, "champion_after": version})

    def clear_challenger(self, decision: dict[str, Any] | None = None) -> None:
        """No challenger any more (and `decision` recorded with that): a running server follows the aliases and
        sends it no canary or shadow traffic (until promote registers the next one)."""
        self._change({"challenger": None}, decision)

    def rollback(self, decision: dict[str, Any] | None = None) -> tuple[str, str]:
        """Make the previous champion champion again, recording `decision` (its champions filled in) with it;
        return (from, to)."""
        aliases = self.aliases()
        if not aliases["champion_history"]:
            raise RegistryError("nothing to roll back to: there has been only one champion (or none)")
        *history, previous = aliases["champion_history"]
        if previous not in self.versions():
            raise RegistryError(f"cannot roll back to {previous!r}: its folder {self.version_dir(previous)} is gone "
                                f"from the registry; restore it (`dvc checkout`, a backup), or make a registered "
                                f"version champion with `amaas promote --force --version V --reason \"...\"`"
                                f" (registered: {', '.join(self.versions()) or 'none'})")
        record = None if decision is None else {
            **decision, "champion_before": aliases["champion"], "champion_after": previous}
        self._change({"champion": previous, "champion_history": history}, record)
        return aliases["champion"], previous

    def decisions(self) -> list[dict[str, Any]]:
        if self.store is not None:
            self.aliases()  # a project moving to the fleet: its file registry is copied first
            return self.store.decisions()
        return self._file_decisions()

    def _file_decisions(self) -> list[dict[str, Any]]:
        if not self._decisions_file.is_file():
            return []
        fix = "restore it (`dvc checkout`, a backup): it is the registry's history, and aliases.json is rebuilt from it"
        decisions = read_json(self._decisions_file, fix=fix)
        if not (isinstance(decisions, list) and all(isinstance(d, dict) for d in decisions)):
            raise DamagedFile(f"{self._decisions_file} is not a list of decisions: {fix}")
        return decisions

    def record(self, decision: dict[str, Any]) -> None:
        self._change({}, decision)

    def _set_aliases(self, **changes: Any) -> None:
        self._change(changes, None)

    def _change(self, changes: dict[str, Any], decision: dict[str, Any] | None) -> None:
        """Apply alias `changes` and append `decision`, in the database as one transaction."""
        if self.store is not None:
            self.store.change({**self.aliases(), **changes} if changes else None, decision)
            # the files mirror the database on the host that changed it: DVC's lineage (deploy depends on
            # aliases.json) and anyone reading the files see the champion the fleet serves
            found = self.store.aliases()
            assert found is not None  # just written
            write_json(self._decisions_file, self.store.decisions())
            write_json(self._aliases_file, found)
            return
        # the decision first: killed between the two writes, the log holds the change and aliases.json is the
        # older one, which checked_aliases() refuses to decide on until it is rebuilt from the log
        aliases = {**self.aliases(), **changes}
        if decision is not None:
            write_json(self._decisions_file, [*self.decisions(), decision])
        if changes:
            write_json(self._aliases_file, aliases)


def aliases_from_decisions(decisions: list[dict[str, Any]]) -> dict[str, Any]:
    """The aliases the recorded decisions lead to: each gate or forced promotion that changed the champion
    pushes the one before onto the history, a rollback pops it."""
    champion: str | None = None
    challenger: str | None = None
    history: list[str] = []
    for decision in decisions:
        challenger = decision.get("challenger", challenger)
        after = decision.get("champion_after", champion)
        if decision.get("action") == "rollback":
            if history and history[-1] == after:
                history.pop()
        elif after != champion and champion is not None:
            history.append(champion)
        champion = after
    return {"champion": champion, "challenger": challenger, "champion_history": history}


def _operator_record(action: str, **fields: Any) -> dict[str, Any]:
    return {"action": action, "by": getpass.getuser(), "at": datetime.now(UTC).isoformat(timespec="seconds"), **fields}


def force_promote(registry: Registry, version: str | None = None, reason: str = "") -> str:
    """Operator override: make `version` (default: the current challenger) champion, gate skipped."""
    target = version or registry.aliases()["challenger"]
    if target is None:
        raise ValueError("no challenger registered: run the pipeline first or pass --version")
    before = registry.champion
    registry.set_champion(target, _operator_record("force_promote", champion_before=before, reason=reason))
    log.warning("operator forced %s to champion (was %s)", target, before)
    return target


def rollback(registry: Registry, reason: str = "") -> str:
    """Operator action: return to the previous champion."""
    before, after = registry.rollback(_operator_record("rollback", reason=reason))
    log.warning("operator rolled back champion %s -> %s", before, after)
    return after


def waiting_approval(registry: Registry) -> dict[str, Any] | None:
    """The gate's decision that waits for a person's approval: the last decision, if it waits and its challenger
    and champion are still the registry's; else None."""
    decisions = registry.decisions()
    last = decisions[-1] if decisions else {}
    aliases = registry.aliases()
    if last.get("awaiting_approval") and (last.get("challenger"), last.get("champion_before")) == (
            aliases["challenger"], aliases["champion"]):
        return last
    return None


def rejection(registry: Registry, challenger: str) -> dict[str, Any] | None:
    """The rejection of `challenger`, if the last answer about it was one (a rejected challenger stays rejected)."""
    answers = [d for d in registry.decisions()
               if d.get("challenger") == challenger and d.get("action") in ("approve", "reject")]
    return answers[-1] if answers and answers[-1]["action"] == "reject" else None


def answer_approval(registry: Registry, approve: bool, by: str | None, note: str, timed_out: bool = False
                    ) -> dict[str, Any]:
    """A person's answer to the challenger that waits for approval, recorded as a decision with their name and
    note and the gate's evidence (`by` None with `timed_out`: nobody answered in time, which rejects). Approved,
    the challenger becomes champion in the same change."""
    pending = waiting_approval(registry)
    if pending is None:
        raise RegistryError("no challenger waits for approval (see `amaas status`: last_decision); a promote run "
                            "with promote.approval borderline or always asks for one")
    who = by or ("nobody in time" if timed_out else "nobody")
    decision = {**{k: v for k, v in pending.items() if k not in ("awaiting_approval", "reason")},
                "action": "approve" if approve else "reject", "by": by, "note": note,
                "at": datetime.now(UTC).isoformat(timespec="seconds"), "timed_out": timed_out, "promoted": approve,
                "reason": f"{'approved' if approve else 'rejected'} by {who}" + (f": {note}" if note else "")}
    if approve:
        registry.set_champion(pending["challenger"], decision)
        decision["champion_after"] = pending["challenger"]
    else:
        decision["champion_after"] = pending["champion_before"]
        registry.record(decision)
    log.warning("%s: challenger %s %s; champion %s", decision["action"], pending["challenger"], decision["reason"],
                decision["champion_after"])
    return decision
