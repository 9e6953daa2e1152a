"""The bento is built from a copy of just what it carries, never from the repository folder itself."""

from __future__ import annotations

from pipelines.serving.bento import CODE_ROOT, build_context


def test_build_context_holds_only_the_service_code_and_params(tmp_path):
    context = build_context(tmp_path)
    assert sorted(p.name for p in context.iterdir()) == ["bentos", "params.yaml", "pipelines"]
    files = {p.relative_to(context).as_posix() for p in context.rglob("*") if p.is_file()}
    assert "bentos/service.py" in files and "bentos/bentofile.yaml" in files and "pipelines/serving/gateway.py" in files
    assert not any("__pycache__" in f or f.startswith((".bentoml", ".venv", "data/")) for f in files)
    assert len(files) == len([*(CODE_ROOT / "pipelines").rglob("*.py"), *(CODE_ROOT / "bentos").glob("*.*")]) + 1
