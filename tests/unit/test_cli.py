"""The CLI turns user mistakes into one clear line and exit code 2, not a traceback."""

import atexit
import gc
import json
import subprocess
from typing import Any

import yaml

from pipelines import runner
from pipelines.cli import main
from pipelines.config import Paths
from pipelines.io import write_json, write_text
from pipelines.runner import run_stage
from tests.conftest import BIN, HEAVY, small_params, write_params


def test_bad_params_file_gives_clear_error(tmp_path, capsys):
    params = small_params(**{"source.simulator.rows_per_batch": "many"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code = main(["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path), "collect"])
    err = capsys.readouterr().err
    assert code == 2
    assert "source.simulator.rows_per_batch" in err and "'many'" in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()


def test_stage_before_its_input_names_the_fix(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small_params()))
    code = main(["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path), "validate"])
    assert code == 2
    assert "run `amaas collect` first" in capsys.readouterr().err


def test_serve_without_champion_and_rollback_without_history(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small_params()))
    base = ["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path)]
    assert main([*base, "serve"]) == 2
    assert "no champion to serve yet" in capsys.readouterr().err
    assert main([*base, "rollback"]) == 2
    assert "nothing to roll back" in capsys.readouterr().err


def test_where_points_at_the_model_cards(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small_params()))
    base = ["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path), "where"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert f"Challenger card:   {tmp_path}/reports/model_card.html (not written yet: `amaas promote` writes it)" in out
    assert "Champion card" not in out  # no champion yet

    paths = Paths(tmp_path)
    version = paths.registry / "versions" / "v1"
    version.mkdir(parents=True)
    (version / "MODEL_CARD.md").write_text("# Model card: v1\n")  # promoted before cards had a page
    write_json(paths.registry_aliases, {"champion": "v1", "challenger": "v1", "champion_history": ["v1"]})
    write_text(paths.model_card_html, "<!DOCTYPE html>")
    assert main(base) == 0
    out = capsys.readouterr().out
    assert f"Challenger card:   {paths.model_card_html} (Markdown: model_card.md)\n" in out
    assert f"Champion card:     {version / 'MODEL_CARD.md'}\n" in out


def test_collect_with_nothing_new_imports_no_heavy_library(tmp_path, monkeypatch):
    """`dvc repro` runs collect every time: with nothing new it must not pay seconds of imports."""
    params = write_params(tmp_path)
    assert run_stage("collect", params, tmp_path)["new_rows"] == 3000
    script = ("import json, sys; from pipelines.cli import main\n"
              f"loaded = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
              f"main(['--params', {str(params)!r}, '--root', {str(tmp_path)!r}, 'collect'])\n"
              f"print(json.dumps([loaded, sorted(m for m in {HEAVY!r} if m in sys.modules)]))\n")
    manifest = (tmp_path / "data" / "raw" / "manifest.json").read_bytes()
    proc = subprocess.run([str(BIN / "python"), "-c", script], capture_output=True, text=True, check=True)
    summary, imported = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert summary["collect"]["new_rows"] == 0 and summary["collect"]["rows"] == 3000
    assert imported == [[], []]  # neither by importing the CLI nor by the collect
    assert (tmp_path / "data" / "raw" / "manifest.json").read_bytes() == manifest  # data/raw unchanged for DVC

    # a change at the source is seen: the simulator with one more day; the stage command's exit skips the
    # garbage collector's walks over the libraries' objects (pipelines.runner.freeze_heap_at_exit)
    registered: list[Any] = []
    monkeypatch.setattr(atexit, "register", registered.append)
    runner.freeze_heap_at_exit.cache_clear()
    write_params(tmp_path, **{"source.simulator.n_batches": 4})
    assert main(["--params", str(params), "--root", str(tmp_path), "collect"]) == 0
    assert registered == [gc.freeze]
    assert json.loads((tmp_path / "data" / "raw" / "manifest.json").read_text())["batches"][-1]["rows"] == 1000
