"""What the DAGs use beyond the stage functions: the project's Airflow Assets and the promotion approval task.

Assets (data-aware scheduling; the UI's asset graph shows the loop): `validated_data` (the validate task of
either DAG), `trained_model` (train), `champion` (a run that changed the champion) and `retrain_needed` (the
monitoring run whose report says so; `pipeline.training_trigger: asset` schedules training_pipeline on it).
Their URIs are the files under the project that hold them.

PromotionApproval is Airflow's human-in-the-loop operator on the registry: when promote left a challenger
waiting for approval (promote.approval), it shows the evidence and waits for Approve or Reject with a note, in the
UI's Required Actions or through the REST API (PATCH .../taskInstances/approval/-1/hitlDetails); the answer goes
into the registry with the responder's name and note. No answer within promote.approval_timeout_min rejects.
Nothing waits: the task is skipped.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Asset, Param

from pipelines.config import Paths

APPROVE, REJECT = "Approve", "Reject"
# the approval form's field, besides the two buttons
NOTE = {"note": Param("", type="string", title="Note", description="Why: recorded in the registry with your name.")}


def assets(paths: Paths) -> dict[str, Asset]:
    """The project's assets by name."""
    where = {"validated_data": paths.validated, "trained_model": paths.trained, "champion": paths.registry_aliases,
             "retrain_needed": paths.drift_details}
    return {name: Asset(name=name, uri=path.as_uri(), group="amaas") for name, path in where.items()}


class PromotionApproval(HITLOperator):
    """Approve or reject the challenger that waits for approval (see the module's docstring)."""

    def __init__(self, *, default_root: Path, **kwargs: Any) -> None:
        """`params`: the DAG's, merged by Airflow with the form's (NOTE, which the DAG file passes)."""
        super().__init__(subject="Promote the challenger?", options=[APPROVE, REJECT], defaults=[REJECT], **kwargs)
        self.default_root = default_root

    def execute(self, context: Any) -> Any:
        from airflow.exceptions import AirflowSkipException

        from pipelines.config import load_settings
        from pipelines.registry import Registry, waiting_approval
        from pipelines.runner import project_files
        from pipelines.stages.promote import approval_request

        params, root = project_files(self.default_root)
        settings, paths = load_settings(params), Paths(root)
        pending = waiting_approval(Registry.of(paths, settings))
        if pending is None:
            raise AirflowSkipException("no challenger waits for approval")
        self.subject, self.body = approval_request(settings, paths, pending)
        self.response_timeout = timedelta(minutes=settings.promote.approval_timeout_min)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from pipelines.runner import answer_in_project

        response = super().execute_complete(context, event)
        user = response.get("responded_by_user")
        decision = answer_in_project(self.default_root, response["chosen_options"] == [APPROVE],
                                     user["name"] if user else None, str(response["params_input"].get("note") or ""),
                                     timed_out=user is None)
        return {k: decision.get(k) for k in ("action", "by", "note", "challenger", "champion_after", "reason")}
