"""`amaas` command line: run stages, the whole pipeline, serving and operator actions.

Only what a command needs is imported (a stage's module, the registry, serving): `amaas collect` with nothing new
returns in a fraction of a second, so `dvc repro` with nothing to do stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.config import PARAMS_ENV, ROOT_ENV, ConfigError, Paths, Settings, StateConfig, load_settings
from pipelines.contracts import UndeclaredSetting, declaration
from pipelines.entry import command_of, global_options
from pipelines.io import read_json, write_text
from pipelines.lock import PipelineLocked, project_lock
from pipelines.runner import STAGES, freeze_heap_at_exit, run_stage, serve_like_openmp, write_dvc_yaml
from pipelines.state.keys import DEFAULT_SCOPES, SCOPES
from pipelines.state.limits import NO_USAGE, SERVER_ENV

log = logging.getLogger("amaas")


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `amaas` for `command`: of the stages, only its declaration is imported (its module); every
    stage's where there is no command yet (`amaas --help`)."""
    parser = argparse.ArgumentParser(prog="amaas", description=__doc__)
    global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGES:
        if command is not None and name != command:
            sub.add_parser(name, help=f"run the {name} stage")  # not this call's command: its module stays unloaded
            continue
        declared = declaration(name)
        p = sub.add_parser(declared.name, help=f"run the {declared.name} stage: {declared.description}")
        for option in declared.options:
            if option.switch:
                p.add_argument(option.flag, action="store_true", help=option.help)
            else:
                p.add_argument(option.flag, metavar=option.metavar, default=option.default, help=option.help)
    sub.add_parser("run", help="run every stage in order: " + " -> ".join(STAGES))
    init = sub.add_parser("init", help="write params.yaml from a sample of your table (schema inference), or "
                          "--check the newest collected batch against it")
    init.add_argument("--source", nargs=2, metavar=("KIND", "WHERE"),
                      help="files FOLDER_OR_GLOB (CSV or Parquet), or sql URL (with --table)")
    init.add_argument("--table", help="with --source sql: the table")
    init.add_argument("--target", help="the label column")
    init.add_argument("--task", default="auto", choices=["auto", "binary", "multiclass", "regression"])
    init.add_argument("--range-margin", type=float, default=0.0,
                      help="numeric reference ranges (monitored, never refused) are widened by this share of the "
                      "observed span on each side; hard bounds are written only where the data shows one")
    init.add_argument("--sample-rows", type=int, default=100_000, help="rows read to infer from (at most)")
    init.add_argument("--force", action="store_true", help="overwrite an existing params file")
    init.add_argument("--check", action="store_true",
                      help="compare the newest collected batch with params.yaml's schema instead")
    rb = sub.add_parser("rollback", help="make the previous champion champion again")
    rb.add_argument("--reason", default="", help="why (recorded in the registry)")
    sub.add_parser("status", help="show champion, challenger, the last registry decision and the last monitoring")
    sub.add_parser("where", help="print where the model, the reports and the endpoint are")
    sc = sub.add_parser("score", help="batch-score a CSV/Parquet file with the champion, in chunks (Dask optional)")
    sc.add_argument("input", type=Path)
    sc.add_argument("output", type=Path, help="Parquet file of id, label, probability (binary), "
                    "proba_<class> per class (or value for regression), model_version")
    sc.add_argument("--version", help="score with this registry version instead of the champion")
    sc.add_argument("--workers", type=int, help="score on a local Dask cluster of this many worker processes")
    keys = sub.add_parser("keys", help="API keys of the HTTP service (stored hashed); list shows each key's scopes, "
                          "limits and usage (requests, rows, 429s) summed over the server's workers")
    keys.add_argument("action", choices=["add", "list", "revoke"])
    keys.add_argument("name", nargs="?", help="the key's name (add, revoke)")
    keys.add_argument("--scope", action="append", choices=SCOPES, dest="scopes",
                      help="add: what the key may do (repeat for both; default predict): predict = POST /predict, "
                      "admin = /admin/reload, /admin/drain, /admin/keys")
    keys.add_argument("--rps", type=float, help="add: this key's requests/s (default serve.rate_limit.rps)")
    keys.add_argument("--burst", type=int, help="add: requests it may send at once (default: ceil(--rps) with --rps, "
                      "else serve.rate_limit.burst)")
    keys.add_argument("--daily-quota", type=int,
                      help="add: rows it may have predicted per UTC day (default serve.rate_limit.daily_quota)")
    dy = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage declarations (pipelines/stages/*.py)")
    dy.add_argument("--check", action="store_true", help="only check that dvc.yaml is current (exit 1 if not)")
    sv = sub.add_parser("serve", help="serve the champion's bento over HTTP")
    sv.add_argument("--host")
    sv.add_argument("--port", type=int)
    fl = sub.add_parser("fleet", help="N replicas of `amaas serve` behind HAProxy on this machine, restarted when "
                        "they die (run, until SIGTERM/SIGINT); `scale N` grows or shrinks the running fleet without "
                        "losing a request; `status` prints it")
    fl.add_argument("action", nargs="?", default="run", choices=["run", "scale", "status"])
    fl.add_argument("count", nargs="?", type=int, help="scale: how many replicas the running fleet should have")
    fl.add_argument("--replicas", type=int, default=2, help="run: replicas to start (default 2)")
    fl.add_argument("--host", help="run: HAProxy's address (default serve.host)")
    fl.add_argument("--port", type=int, help="run: HAProxy's port (default serve.port)")
    fl.add_argument("--folder", type=Path, help="where the fleet keeps HAProxy's files, the replicas' folders and "
                    "logs (default <root>/.fleet)")
    ab = sub.add_parser("ab-report", help="the canary's A/B test: champion against challenger on the labelled "
                        "rows of the prediction log, and the verdict (the report stage writes reports/ab_test.json)")
    ab.add_argument("--json", action="store_true", help="strict JSON instead of text")
    return parser


def _ab_report(args: argparse.Namespace, paths: Paths) -> int:
    """`amaas ab-report`: the A/B test as it stands now (read only: serve.canary_policy acts in the report stage)."""
    from pipelines import abtest

    result = abtest.ab_report(load_settings(args.params), paths)
    print(json.dumps(result, indent=2, allow_nan=False) if args.json else abtest.describe(result))
    return 0


BENTOML_CONFIG_ENV = "BENTOML_CONFIG_OVERRIDES"  # BentoML 1.4: JSON merged over the service's own config


def bentoml_overrides(given: str | None, service: str, workers: int) -> dict[str, Any]:
    """The BentoML config the server runs with: the user's $BENTOML_CONFIG_OVERRIDES (JSON) plus serve.workers
    (config, not baked into the bento: a change needs no new bento) and, while no trace is sampled (BentoML's
    default sample_rate, 0), no OpenTelemetry span at all: making the unsampled spans cost 12% of a worker's CPU
    at 560 rps (measured)."""
    config = json.loads(given or "{}")
    service_config = config.setdefault("services", {}).setdefault(service, {})
    service_config["workers"] = workers
    tracing = service_config.setdefault("tracing", {})
    if not tracing.get("sample_rate"):
        tracing.setdefault("excluded_urls", ".*")
    return config


def _serve(args: argparse.Namespace, paths: Paths) -> int:
    from pipelines.registry import Registry, RegistryError
    from pipelines.serving.bento import ensure_bento

    params = Path(args.params or os.environ.get(PARAMS_ENV) or "params.yaml").resolve()
    if not params.is_file() and StateConfig().resolved().url:  # a fleet's replica in a folder of its own
        return _serve_replica(args, paths)
    settings = load_settings(args.params)
    registry = Registry.of(paths, settings)
    if registry.champion is None:
        raise RegistryError("no champion to serve yet: run `amaas run` (or `dvc repro`) first")
    champion = registry.champion
    bento = ensure_bento(settings, paths, registry.champion_dir())["bento_tag"]  # this code, this model
    host, port, env = _server_env(args, paths, settings, params, champion)
    if settings.serve.strategy == "blue-green":
        return _serve_blue_green(settings, paths, params, env, host, port, bento, champion)
    return _supervise(_bento_command(bento, host, port, settings.serve.keep_alive_s), env)


def _serve_replica(args: argparse.Namespace, paths: Paths) -> int:
    """`amaas serve` in a folder without params.yaml, with $AMAAS_STATE_URL set: a replica of a fleet. It takes
    the champion from the state database, fetches its bento from $AMAAS_ARTIFACTS_URL (with the params.yaml it
    was built with), serves it and follows the shared registry; it keeps nothing another replica needs."""
    from pipelines.registry import Registry, RegistryError
    from pipelines.serving.bento import use_project_home
    from pipelines.state import Shared
    from pipelines.state.artifacts import fetch_bento

    state = Shared(StateConfig(), paths)
    if state.cfg.artifacts_url is None:
        raise ConfigError("a replica without params.yaml fetches the champion's bento from the artifacts store: set "
                          "$AMAAS_ARTIFACTS_URL (where `amaas package` puts the bentos)")
    use_project_home(paths)
    import bentoml

    assert state.registry_store is not None
    champion = Registry(paths.registry, state.registry_store).champion
    if champion is None:
        raise RegistryError("the state database has no champion yet: run the pipeline on the project host with "
                            "$AMAAS_STATE_URL set (`amaas promote` names the champion there)")
    found = state.registry_store.version(champion)
    if found is None or not found["bento"]:
        raise RegistryError(f"champion {champion} has no bento in the artifacts store: run `amaas package` (or "
                            f"`amaas deploy`) on the project host with $AMAAS_ARTIFACTS_URL set")
    fetch_bento(state.cfg.artifacts_url, found["bento"])
    params = Path(bentoml.get(found["bento"]).path) / "src" / "params.yaml"  # the settings it was built with
    settings = load_settings(params)
    host, port, env = _server_env(args, paths, settings, params, champion)
    return _supervise(_bento_command(found["bento"], host, port, settings.serve.keep_alive_s), env)


def _server_env(args: argparse.Namespace, paths: Paths, settings: Settings, params: Path, champion: str
                ) -> tuple[str, int, dict[str, str]]:
    """Where a server listens, and its environment: the project it follows (its registry, params, keys and
    prediction log), and which server start its workers belong to (they share drain and reload, another server
    of the project does not)."""
    from pipelines.serving.bento import SERVICE_NAME
    from pipelines.state import shared

    host, port = args.host or settings.serve.host, args.port or settings.serve.port
    if settings.serve.auth and not shared(settings, paths).keys.names():
        log.warning("serve.auth is on and there is no API key yet: every /predict gets 401 until you run "
                    "`amaas keys add NAME`")
    log.info("serving champion %s at http://%s:%d (POST /predict)", champion, host, port)
    bentoml_config = bentoml_overrides(os.environ.get(BENTOML_CONFIG_ENV), SERVICE_NAME, settings.serve.workers)
    env = {**os.environ, ROOT_ENV: str(paths.root), PARAMS_ENV: str(params),
           SERVER_ENV: os.environ.get(SERVER_ENV) or uuid.uuid4().hex, BENTOML_CONFIG_ENV: json.dumps(bentoml_config)}
    return host, port, env


def _bento_command(bento: str, host: str, port: int, keep_alive_s: int) -> list[str]:
    """The server of one bento: what `amaas serve` runs (hot), or each blue-green backend. An idle keep-alive
    connection is closed after `keep_alive_s` (BentoML hands uvicorn no timeout unless told: idle connections
    stayed open for good)."""
    # `bentoml serve` with a metrics folder of the server's own (pipelines/serving/server.py)
    return [sys.executable, "-m", "pipelines.serving.server", "serve", bento, "--host", host, "--port", str(port),
            "--timeout-keep-alive", str(keep_alive_s)]


def _serve_blue_green(settings: Settings, paths: Paths, params: Path, env: dict[str, str], host: str, port: int,
                      bento: str, champion: str) -> int:
    """serve.strategy blue-green: the front on host:port and the champion's bento behind it, switched by
    `amaas deploy` (pipelines/serving/bluegreen.py)."""
    from pipelines.serving.bluegreen import BACKEND_HOST, BlueGreenError, Supervisor, running_server, smoke_row

    if (other := running_server(paths)) is not None:
        raise BlueGreenError(f"a blue-green server of this project is running already (pid {other['supervisor_pid']}"
                            f"): stop it first, or `amaas deploy` to switch what it serves")

    def launch(tag: str, backend_port: int, backend_env: dict[str, str]) -> subprocess.Popen[bytes]:
        # each backend is a server start of its own: draining or reloading one leaves the other alone
        return _spawn(_bento_command(tag, BACKEND_HOST, backend_port, settings.serve.keep_alive_s),
                      {**backend_env, SERVER_ENV: uuid.uuid4().hex})

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request the front forwards
    supervisor = Supervisor(paths, params, launch, env)
    return supervisor.run(host, port, bento, champion, smoke_row(paths, champion))


def _fleet(args: argparse.Namespace, paths: Paths) -> int:
    """`amaas fleet`: replicas behind HAProxy (pipelines/serving/fleet.py). With $AMAAS_STATE_URL set, each replica
    is `amaas serve` in an empty folder of its own; without it, a replica of this project."""
    from pipelines.serving import fleet

    folder = (args.folder or paths.root / fleet.FLEET_DIR).resolve()
    if args.action == "status":
        print(json.dumps(fleet.running_fleet(folder) or {"running": False, "folder": str(folder)}, indent=2))
        return 0
    if args.action == "scale":
        if args.count is None:
            raise ValueError("amaas fleet scale N: say how many replicas")
        state = fleet.request_scale(folder, args.count)
        print(json.dumps({"url": state["url"], "replicas": len(state["replicas"]), "asked": args.count}))
        return 0
    if StateConfig().resolved().url:
        host, port, command = args.host or fleet.REPLICA_HOST, args.port or fleet.DEFAULT_PORT, fleet.state_replica()
    else:
        settings = load_settings(args.params)
        params = Path(args.params or os.environ.get(PARAMS_ENV) or "params.yaml").resolve()
        fleet.prepare_project(paths.root, params)
        host, port = args.host or settings.serve.host, args.port or settings.serve.port
        command = fleet.project_replica(paths.root, params)
    stopping: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: stopping.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with fleet.Fleet(folder, args.replicas, command, host=host, port=port) as running:
            log.info("fleet: %d replicas behind %s (files in %s); `amaas fleet scale N` to resize", args.replicas,
                     running.url, folder)
            running.serve_forever(lambda: bool(stopping))
            log.info("fleet: stopping (draining HAProxy, then the replicas)")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


DRAIN_S = 30.0  # after SIGTERM/SIGINT: how long requests in flight have to finish before the server is killed


def _die_with_parent() -> None:
    """In the server, before exec: SIGTERM it if `amaas serve` dies unhandled (SIGKILL), so none is orphaned."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # Linux only (prctl PR_SET_PDEATHSIG)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A server in its own process group (signals reach all of it through os.killpg), gone when we are."""
    return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)


def _supervise(cmd: list[str], env: dict[str, str]) -> int:
    """Run the server in its own process group and pass SIGTERM/SIGINT on to all of it: it stops taking
    requests, finishes those in flight (DRAIN_S at most, then SIGKILL) and frees the port before we exit."""
    server = _spawn(cmd, env)
    stopping: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        if not stopping:
            log.info("signal %d: draining the server (at most %.0f s)", signum, DRAIN_S)
        stopping.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    deadline: float | None = None
    try:
        while (code := server.poll()) is None:
            time.sleep(0.2)  # a signal handler runs between sleeps
            if stopping and deadline is None:
                deadline = time.monotonic() + DRAIN_S
            if deadline is not None and time.monotonic() > deadline:
                log.error("the server did not stop within %.0f s: killing it", DRAIN_S)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGKILL)
                deadline = float("inf")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        with contextlib.suppress(ProcessLookupError):  # workers left behind by the server's own exit
            os.killpg(server.pid, signal.SIGKILL)
    return 0 if stopping else code


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user's mistake (bad settings, bad data, a refused action) is one line on stderr and
    exit code 2; anything else is a bug and shows its traceback."""
    command = command_of(argv)
    if command is not None:
        serve_like_openmp(command)  # before the stage's module (and OpenMP with it) loads: see pipelines.runner
    args = _parser(command).parse_args(argv)
    ours = not logging.getLogger().handlers  # the console script's own process, not a host that logs already
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in (*STAGES, "run"):
        freeze_heap_at_exit()  # the stages' libraries are not torn down object by object at exit
    if ours and not args.verbose and args.command in (*STAGES, "run"):  # only the handler basicConfig made
        logging.captureWarnings(True)  # the libraries' Python warnings go through the filter too
        for handler in logging.getLogger().handlers:
            handler.addFilter(_stage_lines)
    paths = Paths(Path(args.root).resolve()) if args.root else Paths.from_env()
    try:
        return COMMANDS.get(args.command, _stage)(args, paths)
    except (ConfigError, PipelineLocked, UndeclaredSetting, FileNotFoundError, ValueError) as exc:  # InitError too
        print(f"amaas: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not _user_error(exc):
            raise
        print(f"amaas: error: {exc}", file=sys.stderr)
        return 2


# A user's mistake, by module and class, beyond those main() names: looked up only in a module already imported
# (an exception of a class whose module never loaded cannot have been raised), so naming them costs no imports.
USER_ERRORS = (("pipelines.sources", "SourceError"), ("pipelines.stages.validate", "DataValidationError"),
               ("pipelines.registry", "RegistryError"), ("pipelines.stages.deploy", "DeployError"),
               ("pipelines.stages.report", "MonitoringError"), ("pipelines.serving.bluegreen", "BlueGreenError"),
               ("pipelines.serving.fleet", "FleetError"))


def _user_error(exc: Exception) -> bool:
    return any(isinstance(exc, getattr(sys.modules[module], name)) for module, name in USER_ERRORS
               if module in sys.modules)


def _stage_lines(record: logging.LogRecord) -> bool:
    """What a stage command logs without -v: each stage's end with its key figures (pipelines.runner), and the
    project's warnings and errors; the stages' own progress, the libraries' INFO lines (Great Expectations,
    Evidently, BentoML...) and their Python warnings (scikit-learn's undefined precision...) only with -v."""
    if record.name == "py.warnings":
        return False
    return record.levelno >= logging.WARNING or record.name == "pipelines.runner"


def _stage(args: argparse.Namespace, paths: Paths) -> int:
    """`amaas <stage>`: the stage with its command-line options, under the project lock. The summary is printed
    as JSON, except under `dvc repro` (DVC_STAGE set), whose log has its key figures on the stage's one line."""
    options = {o.dest: getattr(args, o.dest) for o in declaration(args.command).options}
    with _locked(args, paths):
        summary = run_stage(args.command, args.params, paths.root, **options)
    if "DVC_STAGE" not in os.environ:
        print(json.dumps({args.command: summary}, default=str))
    return _stopped(summary)


def _stopped(summary: dict[str, Any]) -> int:
    """A stage whose summary waits for a person's approval stops the command (exit code 3, so `dvc repro` stops
    there too) with the way to answer; else 0."""
    if not summary.get("awaiting_approval"):
        return 0
    print(f"amaas: {summary['reason']}\namaas: answer with `amaas promote --approve --note \"...\"` or "
          f"`amaas promote --reject --note \"...\"`, then run again", file=sys.stderr)
    return 3


def _run_all(args: argparse.Namespace, paths: Paths) -> int:
    """`amaas run`: every stage in order, until one waits for approval; the project stays locked across all."""
    with _locked(args, paths):
        for stage in STAGES:
            summary = run_stage(stage, args.params, paths.root)
            print(json.dumps({stage: summary}, default=str))
            if code := _stopped(summary):
                return code
    _print_where(paths, load_settings(args.params))
    return 0


def _rollback(args: argparse.Namespace, paths: Paths) -> int:
    from pipelines.registry import Registry, rollback

    with _locked(args, paths):
        print(json.dumps({"champion": rollback(Registry.of(paths, load_settings(args.params)), args.reason)}))
    return 0


def _status(args: argparse.Namespace, paths: Paths) -> int:
    from pipelines.registry import Registry

    registry = Registry.of(paths, load_settings(args.params))
    history = paths.monitoring_history
    aliases = registry.aliases()
    champion = aliases.get("champion")
    metadata = registry.version_dir(champion) / "metadata.json" if champion else None
    compression = read_json(metadata).get("compression", {}) if metadata and metadata.is_file() else {}
    figures = compression.get("served_figures", {})
    cost = read_json(paths.cost_report) if paths.cost_report.is_file() else {}
    print(json.dumps({**aliases, "last_decision": next(reversed(registry.decisions()), None),
                      "last_monitoring": (read_json(history) if history.is_file() else [None])[-1],
                      "champion_serving": {"model": compression.get("served"),
                                           **{k: figures.get(k) for k in ("latency_ms_p50", "latency_ms_p99",
                                                                          "rows_per_s", "usd_per_1k_rows")}},
                      "training_cost": cost.get("total")}, indent=2))
    return 0


def _score(args: argparse.Namespace, paths: Paths) -> int:
    from pipelines import score

    summary = score.run(load_settings(args.params), paths, args.input, args.output, args.version, args.workers)
    print(json.dumps({"score": summary}))
    return 0


def _where(args: argparse.Namespace, paths: Paths) -> int:
    _print_where(paths, load_settings(args.params))
    return 0


def _dvc_yaml(args: argparse.Namespace, paths: Paths) -> int:
    current = write_dvc_yaml(paths.root, check=args.check)
    target = paths.root / "dvc.yaml"
    if args.check:
        print(f"{target} is " + ("current" if current else "out of date: run `amaas dvc-yaml`"), file=sys.stderr)
        return 0 if current else 1
    print(f"{target} " + ("was current" if current else "written from the stage declarations"), file=sys.stderr)
    return 0


def _init(args: argparse.Namespace, paths: Paths) -> int:
    """`amaas init`: infer and write params.yaml, or (--check) list what new data does that it does not allow."""
    from pipelines import schema_inference as si

    target = Path(args.params or os.environ.get(PARAMS_ENV) or paths.root / "params.yaml")
    if args.check:
        found = si.check(load_settings(target), paths)
        print(json.dumps(found, indent=2))
        return 1 if found["problems"] else 0
    if not args.source or not args.target:
        raise si.InitError("amaas init needs --source (files PATH | sql URL --table T) and --target COLUMN")
    if target.exists() and not args.force:
        raise si.InitError(f"{target} exists: pass --force to overwrite it (or --params to write elsewhere)")
    kind, where = args.source
    if kind == "files":
        settings, folder, pattern = si.files_source(where, paths.root)
        sample = si.read_files_sample(folder, pattern, args.sample_rows)
        source, described = {"kind": "files", "files": settings}, f"{len(sample)} rows of {folder}/{pattern}"
    elif kind == "sql":
        if not args.table:
            raise si.InitError("--source sql needs --table")
        sample = si.read_sql_sample(where, args.table, args.sample_rows, paths.root)
        source = {"kind": "sql", "sql": {"url": si.url_without_password(where), "table": args.table, "schema": None}}
        described = f"{len(sample)} rows of table {args.table}"
    else:
        raise si.InitError(f"--source {kind}: use files or sql")
    inferred = si.infer_schema(sample, args.target, args.task, args.range_margin)
    expectations = (paths.root / "expectations" / "extra.json").is_file()
    text = si.params_text(inferred, source, described, expectations=expectations)
    _loads(text, target)
    write_text(target, text)
    schema = inferred.schema
    print(f"wrote {target} from {described}")
    print(f"  task {schema['task']} on {schema['target']!r}; id {schema['id_column']}; time {schema['time_column']}"
          f" ({schema['time_unit'] or 'no unit'}); {len(schema['numeric'])} numeric, "
          f"{len(schema['categorical'])} categorical column(s)")
    if kind == "sql" and si.url_without_password(where) != where:
        inferred.review.append("the password is not written to params.yaml: set $AMAAS_SOURCE_URL to the full URL")
    for note in inferred.review:
        print(f"  check: {note}")
    print("next: review the schema in params.yaml, then `dvc repro` (or `make run`)")
    return 0


def _loads(text: str, where: Path) -> Settings:
    """Validate settings before they are written: init never leaves a params.yaml that does not load."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / where.name
        probe.write_text(text)
        return load_settings(probe)


def _keys(args: argparse.Namespace, paths: Paths) -> int:
    from pipelines.state import Shared

    params = Path(args.params or os.environ.get(PARAMS_ENV) or "params.yaml")
    # the project's key store, or a fleet's ($AMAAS_STATE_URL works without a params.yaml too)
    state = Shared(load_settings(params).state if params.is_file() else StateConfig(), paths)
    store = state.keys
    if args.action == "list":
        defaults = load_settings(args.params).serve.rate_limit
        usage = state.limits.usage()
        print(json.dumps({name: {"created": entry.created, "scopes": list(entry.scopes),
                                 **vars(entry.limit(defaults)), **vars(usage.get(name, NO_USAGE))}
                          for name, entry in store.entries().items()}, indent=2))
        return 0
    if not args.name:
        raise ValueError(f"`amaas keys {args.action}` needs a NAME")
    if args.action != "add" and (args.scopes or args.rps is not None or args.burst is not None
                                 or args.daily_quota is not None):
        raise ValueError("--scope, --rps, --burst and --daily-quota go with `amaas keys add`")
    if args.action == "add":
        print(store.add(args.name, tuple(args.scopes or DEFAULT_SCOPES), args.rps, args.burst,
                        args.daily_quota))  # the only time the key is shown
        where = "the state database" if state.fleet else str(paths.api_keys)
        print(f"API key {args.name!r} created: send it as 'Authorization: Bearer <key>'; it is stored only as a "
              f"hash in {where}", file=sys.stderr)
    else:
        state.revoke(args.name)
        print(f"API key {args.name!r} revoked", file=sys.stderr)
    return 0


def _locked(args: argparse.Namespace, paths: Paths) -> contextlib.AbstractContextManager[None]:
    return project_lock(paths.root, load_settings(args.params).pipeline.lock_timeout_s)


def _print_where(paths: Paths, settings: Settings) -> None:
    from pipelines.registry import Registry

    registry = Registry.of(paths, settings)
    champion = registry.champion
    url = f"http://{settings.serve.host}:{settings.serve.port}"
    print(f"\nChallenger model:  {paths.challenger}")
    print(f"Champion:          {champion} (registry: {paths.registry})")
    print(f"Challenger card:   {_card(paths.model_card_html, paths.model_card)}")
    if champion is not None:
        folder = registry.version_dir(champion)
        print(f"Champion card:     {_card(folder / Paths.MODEL_CARD_HTML_FILE, folder / Paths.MODEL_CARD_FILE)}")
    print(f"Reports:           {paths.reports}/ metrics.json, drift.html, validation.json, promotion.json")
    print(f"Data Docs:         {paths.data_docs / 'index.html'} (Great Expectations, per batch)")
    print(f"Quarantined rows:  {paths.quarantined_rows}")
    print(f"Endpoint:          `make serve` (or `amaas serve`) -> POST {url}/predict, docs at {url}/docs "
          f"(API key: `amaas keys add NAME`)")


def _card(page: Path, markdown: Path) -> str:
    """Where a model card is: its HTML page, else the Markdown of a version promoted before cards had pages."""
    if page.is_file():
        return f"{page} (Markdown: {markdown.name})"
    return str(markdown) if markdown.is_file() else f"{page} (not written yet: `amaas promote` writes it)"


COMMANDS: dict[str, Callable[[argparse.Namespace, Paths], int]] = {
    "run": _run_all, "init": _init, "rollback": _rollback, "status": _status, "where": _where, "score": _score,
    "keys": _keys, "serve": _serve, "dvc-yaml": _dvc_yaml,
    "ab-report": _ab_report, "fleet": _fleet}  # every other command is a stage (_stage)


if __name__ == "__main__":  # as the console script: a stage command may run in the stage host
    from pipelines.entry import main as entry

    sys.exit(entry())
