"""`python -m pipelines.airflow_cli dags test training_pipeline`: Airflow's own CLI, whose in-process execution API
starts in about a second instead of Airflow's 9 to 20 (measured at load average 4 to 6 on 2 cores).

`airflow dags test` runs every task inside the CLI's own process and answers the tasks' Task SDK calls with an
execution API built in that process (InProcessExecutionAPI). Built as for the API server, the app makes Cadwyn
generate its routes for every version of the API that Airflow still serves (nine dated versions of some 55 routes)
on the first call: most of what a training_pipeline run paid outside its stages. Only this process's own Task SDK
calls that API, always at the one version it speaks (`API_VERSION`), so here Cadwyn generates that version's routes
alone: the head routes, which are that version's routes unchanged. Every other command, the API server, the
scheduler and plain `airflow dags test` build the API as Airflow does; so does this one when the Task SDK does not
speak the API's newest version (an SDK older than the server), since then older routes are what it needs.
tests/integration/test_airflow.py checks that both ways give the Task SDK's version the same routes and models.
"""

from __future__ import annotations

import copy
import sys
from typing import Any


def latest_version_routes() -> None:
    """Make Cadwyn build only the routes of the version the Task SDK speaks, for Airflow's execution API (see the
    module's docstring); any other Cadwyn app, and an SDK that speaks an older version, keep the full generation."""
    import cadwyn.applications
    from airflow.api_fastapi.execution_api.versions import bundle
    from airflow.sdk.api.datamodels._generated import API_VERSION
    from cadwyn import HeadVersion, Version, VersionBundle
    from cadwyn.route_generation import _DELETED_ROUTE_TAG, generate_versioned_routers
    from fastapi.routing import APIRoute

    if bundle.versions[0].value != API_VERSION:
        return

    def generate(router: Any, versions: VersionBundle, **options: Any) -> Any:
        if versions is not bundle:
            return generate_versioned_routers(router, versions, **options)
        # the newest version's routes are the head routes: no version change applies between them. The routes that
        # exist only in older versions (marked deleted in head) are left out, as Cadwyn leaves them out of it.
        latest = VersionBundle(HeadVersion(), Version(API_VERSION), api_version_var=versions.api_version_var)
        head = copy.copy(router)
        head.routes = [route for route in router.routes
                       if not (isinstance(route, APIRoute) and _DELETED_ROUTE_TAG in route.tags)]
        return generate_versioned_routers(head, latest, **options)

    cadwyn.applications.generate_versioned_routers = generate


def main(argv: list[str] | None = None) -> int:
    """Run Airflow's CLI with `argv` (default: this process's arguments), the execution API trimmed as above."""
    latest_version_routes()
    from airflow.__main__ import main as airflow_main

    sys.argv = ["airflow", *(sys.argv[1:] if argv is None else argv)]
    airflow_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
