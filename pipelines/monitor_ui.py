"""`make monitor` (`python -m pipelines.monitor_ui`): Evidently's UI on the project's workspace, and the URL.

`evidently ui` serves reports/workspace (every `amaas report` run adds its snapshots there) on 127.0.0.1
only. The project and its dashboard are created first if no report has run yet, and snapshot files that
Evidently cannot read are moved to reports/workspace/damaged/ (one makes the UI answer every project page with
an error 500). The UI watches the folder: a report run while it is up shows on the next page load. Ctrl-C
stops it.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipelines.config import PARAMS_ENV, ROOT_ENV, Paths, load_settings
from pipelines.workspace import PROJECT_ID, open_project, set_aside_damaged

REPO = Path(__file__).resolve().parent.parent


def ui_answers(url: str) -> bool:
    try:
        # bandit B310 is safe: url is http://127.0.0.1:<port>, the UI this module starts
        with urllib.request.urlopen(f"{url}/api/projects", timeout=2) as response:  # nosec B310
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def prepare(root: Path, params: Path) -> Path:
    """The project's workspace, ready for `evidently ui`: project and dashboard there, damaged snapshots out."""
    settings = load_settings(params)
    folder = Paths(root).workspace
    open_project(folder, settings.promote.metric)
    set_aside_damaged(folder)  # each file moved is logged
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get(ROOT_ENV) or REPO),
                        help="project folder with params.yaml; its reports/workspace is shown")
    parser.add_argument("--params", type=Path, default=None, help="settings file (default: <root>/params.yaml)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("MONITOR_PORT") or 8000))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    root = args.root.resolve()
    params = args.params or Path(os.environ.get(PARAMS_ENV) or root / "params.yaml")
    folder = prepare(root, params)
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "EVIDENTLY_DISABLE_TELEMETRY": os.environ.get("EVIDENTLY_DISABLE_TELEMETRY", "1")}
    server = subprocess.Popen([str(Path(sys.executable).parent / "evidently"), "ui", "--workspace", str(folder),
                               "--host", "127.0.0.1", "--port", str(args.port)], env=env)
    try:
        started = time.monotonic()
        while server.poll() is None and not ui_answers(url):
            if started and time.monotonic() - started > 120:
                print(f"{url}/api/projects has not answered for 2 minutes: see evidently's log above (another "
                      f"project's damaged file in {folder}?)", file=sys.stderr, flush=True)
                started = 0.0
            time.sleep(0.5)
        if server.poll() is None:
            print(f"\n{'=' * 72}\nEvidently UI: {url}\nDashboard:    {url}/projects/{PROJECT_ID}\n"
                  f"Workspace:    {folder}\nStop with Ctrl-C.\n{'=' * 72}\n", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return server.wait()


if __name__ == "__main__":
    sys.exit(main())
