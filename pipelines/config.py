"""Typed settings loaded from params.yaml, and the project's file layout.

Every tunable lives in params.yaml; this module turns it into validated objects and turns
mistakes into messages that name the key and how to fix it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

PARAMS_ENV = "AMAAS_PARAMS"
ROOT_ENV = "AMAAS_ROOT"
EXPERIMENT_ENV = "DVC_EXP_NAME"  # set by `dvc exp run`: the run is an experiment, not a release


def experiment_name() -> str | None:
    """The name of the DVC experiment being run, or None on the main line (`dvc repro`, Airflow, the CLI)."""
    return os.environ.get(EXPERIMENT_ENV) or None


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or holds a bad value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SimulatorConfig(_Strict):
    start_date: date
    n_batches: int = Field(ge=1, le=3650)
    rows_per_batch: int = Field(ge=10, le=100_000_000)
    malformed_share: float = Field(ge=0, le=1)
    drift_start_batch: int | None = Field(default=None, ge=0)
    drift_strength: float = Field(default=1.0, ge=0, le=100)
    extra_features: int = Field(default=0, ge=0, le=1000)  # numeric columns extra_0.. derived from the real ones


def password_in(url: str | None) -> bool:
    """Whether a URL carries a password (user:password@host)."""
    return url is not None and "://" in url and urlsplit(url).password is not None


class SqlSourceConfig(_Strict):
    url: str = Field(min_length=1)  # SQLAlchemy URL; a relative sqlite path is taken from the project root
    table: str = Field(min_length=1)
    db_schema: str | None = Field(default=None, alias="schema")

    @field_validator("url")
    @classmethod
    def _no_password(cls, value: str) -> str:
        if password_in(value):  # params.yaml is in git, dvc.lock copies it, every bento carries it
            raise ValueError("holds a password: params.yaml is committed (and copied into dvc.lock and every bento); "
                             "write the URL without it here and set $AMAAS_SOURCE_URL to the full URL")
        return value


class FilesSourceConfig(_Strict):
    path: str = Field(min_length=1)  # drop folder, relative to the project root
    pattern: str = "*.parquet"  # glob inside it; files ending in .csv or .parquet


class SourceConfig(_Strict):
    kind: Literal["simulator", "sql", "files"] = "simulator"
    watermark_column: str | None = None  # default: schema.time_column
    split_by_day: bool = True
    simulator: SimulatorConfig
    sql: SqlSourceConfig | None = None
    files: FilesSourceConfig | None = None

    @model_validator(mode="after")
    def _kind_has_settings(self) -> SourceConfig:
        if getattr(self, self.kind) is None:
            raise ValueError(f"source.kind is {self.kind!r} but there is no source.{self.kind} section: add it")
        return self


class NumericRule(_Strict):
    """A numeric column: hard bounds and a reference range.

    `min`/`max` are hard bounds: impossible values (a negative count, a share above 1), quarantined by validation
    and refused by serving (422); either may be left out (null: no bound on that side). Params files written
    before reference ranges existed keep their `min`/`max` as hard bounds, as they always were.
    `reference: [low, high]` is what training saw: a value outside it is valid, served, counted (serving's
    /metrics, the prediction log) and reported by monitoring as drift, never refused.
    """

    min: float | None = None
    max: float | None = None
    reference: tuple[float, float] | None = None
    nullable: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> NumericRule:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        if self.reference is not None and self.reference[0] > self.reference[1]:
            raise ValueError(f"reference {list(self.reference)} must be [low, high] with low <= high")
        return self

    def outside_reference(self, values: Any) -> Any:
        """Where `values` (numbers; NaN for missing) leave the reference range: a boolean mask (all False without
        one). Works on arrays and Series alike."""
        if self.reference is None:
            return values < float("-inf")  # all False, the shape of `values`
        low, high = self.reference
        return (values < low) | (values > high)


Task = Literal["binary", "multiclass", "regression"]
TimeUnit = Literal["s", "ms", "us", "ns", "D"]  # the epoch units pandas reads integer times in
ROW_KEY = "_row_key"  # a table with no id column: a stable hash of the row identifies it (see row_keys)


class CategoricalRule(_Strict):
    values: list[str] = Field(min_length=1)
    nullable: bool = False  # missing is then a category of its own, in training and in serving

    @field_validator("values", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        """Codes written as numbers (`rating: [1, 2, 3]`) are categories spelled "1", "2", "3"."""
        if isinstance(value, list):
            return [v if isinstance(v, str) else str(v) for v in value]
        return value


class SchemaConfig(_Strict):
    task: Task = "binary"
    id_column: str | None = None  # null: a stable hash of the row identifies it
    time_column: str | None = None  # null: no time order (files: one batch per new file; sql: an increasing id)
    time_unit: TimeUnit | None = None  # an integer time column: epoch unit;
    # null: integers are ordinal values (a year, a sequence number), never read as nanoseconds
    target: str
    classes: list[str | int] | None = None  # class labels in order (binary: the last is the positive class);
    # null: the sorted labels of the training rows
    numeric: dict[str, NumericRule] = {}
    categorical: dict[str, CategoricalRule] = {}

    @field_validator("categorical", mode="before")
    @classmethod
    def _lists_are_rules(cls, value: Any) -> Any:
        """`col: [a, b]` is short for `col: {values: [a, b]}`."""
        if isinstance(value, dict):
            return {k: {"values": v} if isinstance(v, list) else v for k, v in value.items()}
        return value

    @property
    def feature_columns(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    @property
    def key_column(self) -> str:
        """The column that identifies a row: the id column, or the row hash of a table without one."""
        return self.id_column or ROW_KEY

    @property
    def columns(self) -> list[str]:
        """The columns a batch must have, in order (id and time only where the schema names them)."""
        return [c for c in (self.id_column, self.time_column) if c] + [*self.feature_columns, self.target]

    @property
    def is_classification(self) -> bool:
        return self.task != "regression"

    @model_validator(mode="after")
    def _consistent(self) -> SchemaConfig:
        if not self.feature_columns:
            raise ValueError("the schema has no feature columns: list them under schema.numeric and/or "
                             "schema.categorical")
        named = [c for c in (self.id_column, self.time_column, self.target, *self.feature_columns) if c]
        twice = sorted({c for c in named if named.count(c) > 1})
        if twice:
            raise ValueError(f"column(s) {twice} appear in more than one role (id, time, target, feature): "
                             f"give each column one role")
        if self.classes is not None:
            if self.task == "regression":
                raise ValueError("schema.classes is for classification; remove it for task regression")
            if len(set(map(str, self.classes))) != len(self.classes):
                raise ValueError(f"schema.classes {self.classes} names a class twice")
            if self.task == "binary" and len(self.classes) != 2:
                raise ValueError(f"task binary needs exactly 2 classes, schema.classes has {len(self.classes)}: "
                                 f"set schema.task: multiclass")
            if self.task == "multiclass" and len(self.classes) < 3:
                raise ValueError("task multiclass needs at least 3 classes; with 2, set schema.task: binary")
        if self.time_unit is not None and self.time_column is None:
            raise ValueError("schema.time_unit is set but there is no schema.time_column")
        return self


class ValidateConfig(_Strict):
    max_bad_share: float = Field(ge=0, le=1)
    min_rows: int = Field(ge=0, le=1_000_000_000)
    batch_rows: tuple[int, int] = (1, 10_000_000)
    expectations_file: str | None = None  # extra GE expectations (JSON list), relative to the project root
    # rows per chunk of the vectorized row-rule evaluation
    chunk_rows: int = Field(default=1_000_000, ge=1, le=100_000_000)

    @model_validator(mode="after")
    def _bounds(self) -> ValidateConfig:
        lo, hi = self.batch_rows
        if not 0 <= lo <= hi:
            raise ValueError("batch_rows must be [min, max] with 0 <= min <= max")
        return self


class CleanConfig(_Strict):
    normalize_categories: bool = True
    impute: Literal["median", "mean", "zero"] = "median"
    missing_indicators: bool = True
    clip_quantiles: tuple[float, float] | None = (0.001, 0.999)

    @model_validator(mode="after")
    def _quantiles(self) -> CleanConfig:
        if self.clip_quantiles is not None:
            lo, hi = self.clip_quantiles
            if not 0 <= lo < hi <= 1:
                raise ValueError("clip_quantiles must be [low, high] with 0 <= low < high <= 1, or null")
        return self


class PrepareConfig(_Strict):
    valid_share: float = Field(gt=0, lt=0.5)
    test_share: float = Field(gt=0, lt=0.5)
    split: Literal["time", "random"] = "time"  # random: stratified by class and seeded
    drop_duplicate_rows: bool | None = None  # deprecated and ignored: identical rows now stay in one split
    # the transform's statistics on a seeded sample of this
    fit_rows: int | None = Field(default=None, ge=1000, le=1_000_000_000)
    #   many training rows (every category and class kept); null: on all of them

    @field_validator("drop_duplicate_rows")
    @classmethod
    def _deprecated(cls, value: bool | None) -> bool | None:
        if value is not None:  # older params files set it: they keep working, and are told what changed
            warnings.warn("prepare.drop_duplicate_rows is deprecated and ignored: identical rows (features and "
                          "label) now go to one split, so no held-out row copies a training row and none is "
                          "dropped; remove the key from params.yaml", FutureWarning, stacklevel=2)
        return value


class LightGBMConfig(_Strict):
    n_estimators: int = Field(ge=1, le=100_000)
    learning_rate: float = Field(gt=0, le=1)
    num_leaves: int = Field(ge=2, le=131_072)
    min_child_samples: int = Field(ge=1, le=1_000_000)
    early_stopping_rounds: int = Field(ge=1, le=10_000)


class XGBoostConfig(_Strict):
    n_estimators: int = Field(ge=1, le=100_000)
    learning_rate: float = Field(gt=0, le=1)
    max_depth: int = Field(ge=1, le=64)
    early_stopping_rounds: int = Field(ge=1, le=10_000)


class MLPConfig(_Strict):
    hidden: list[int] = Field(min_length=1)
    embedding_dim: int = Field(ge=1, le=1024)
    epochs: int = Field(ge=1, le=10_000)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"  # auto: by rows and device
    learning_rate: float = Field(gt=0, le=10)  # at a batch of 256 (auto scales it with the square root of the batch)
    patience: int = Field(ge=1, le=10_000)
    compile: bool = False  # train through torch.compile (pays a compile of tens of seconds; for long GPU runs)
    autocast: bool = False  # bf16 steps on a GPU: for wide networks (the default 64-32 one ran 5% slower with it)


Learner = Literal["lightgbm", "xgboost", "mlp"]


class SearchRange(_Strict):
    low: float
    high: float
    scale: Literal["linear", "log", "int"] = "linear"

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if self.low > self.high or (self.scale == "log" and self.low <= 0):
            raise ValueError("a search range needs low <= high, and low > 0 on a log scale")
        return self


class TuningConfig(_Strict):
    trials: int = Field(default=0, ge=0, le=10_000)  # 0: no tuning
    time_budget_s: float = Field(default=600, gt=0, le=604_800)  # per learner
    space: dict[Learner, dict[str, SearchRange]] = {}


class TrainConfig(_Strict):
    ensemble: Literal["averaging", "blending", "stacking", "bagging"]
    learners: list[Learner] = Field(min_length=1)
    stacking_folds: int = Field(ge=2, le=20)
    bags: int = Field(default=5, ge=2, le=50)  # bagging: bootstrap fits of each learner
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(ge=1, le=1024)
    lightgbm: LightGBMConfig
    xgboost: XGBoostConfig
    mlp: MLPConfig
    tuning: TuningConfig = TuningConfig()
    # learners fit on a seeded sample of this many training rows
    max_rows: int | None = Field(default=None, ge=100, le=1_000_000_000)
    #   (stratified by class for classification); null: on all of them

    @model_validator(mode="after")
    def _tunable(self) -> TrainConfig:
        for kind, space in self.tuning.space.items():
            known = set(type(getattr(self, kind)).model_fields)
            wrong = sorted(set(space) - known)
            if wrong:
                raise ValueError(f"tuning.space.{kind} names {wrong}, which {kind} does not have "
                                 f"(it has {', '.join(sorted(known))})")
        return self


class Costs(_Strict):
    false_positive: float = Field(ge=0, le=1e9)
    false_negative: float = Field(ge=0, le=1e9)


class EvaluateConfig(_Strict):
    # binary: label cut-off; auto = picked on valid rows
    threshold: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | Literal["auto"] = 0.5
    costs: Costs | None = None  # threshold auto: least expected cost with these; null: the cut-off of max F1
    slices: list[str] = []  # categorical columns to report metrics per value of
    calibration_bins: int = Field(default=10, ge=2, le=100)
    explain_rows: int = Field(default=2000, ge=50, le=1_000_000)  # test rows explained for reports/explain.json


# the metrics promote.metric may name, by task (kept here, not in pipelines.metrics, so that loading settings does
# not import scikit-learn: `amaas collect` with nothing new stays fast)
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("roc_auc", "pr_auc", "log_loss", "accuracy", "f1", "cohen_kappa"),
    "multiclass": ("accuracy", "f1_macro", "f1_weighted", "log_loss", "cohen_kappa"),
    "regression": ("rmse", "mae", "r2"),
}


class PromoteConfig(_Strict):
    metric: Literal["roc_auc", "pr_auc", "log_loss", "accuracy", "f1", "f1_macro", "f1_weighted", "cohen_kappa",
                    "rmse", "mae", "r2"]
    min_first_metric: float | None = None  # a first champion needs a defined metric at least this good
    min_improvement: float = Field(ge=0, le=1e9)
    bootstrap_samples: int = Field(ge=10, le=100_000)
    max_p_value: float = Field(gt=0, le=1)
    max_latency_ms: float | None = Field(default=None, gt=0, le=1e6)  # the challenger's single-row p99, in process
    # the challenger's serving cost per 1,000 rows (USD)
    max_cost_per_1k: float | None = Field(default=None, gt=0, le=1e6)
    # a person signs off: never; borderline (p-value in (max_p_value, approval_max_p_value], or a slice that
    # loses more than max_slice_loss); always (every change of champion the gate would make, and borderline ones)
    approval: Literal["never", "borderline", "always"] = "never"
    approval_max_p_value: float = Field(default=0.2, gt=0, le=1)
    max_slice_loss: float = Field(default=0.02, ge=0, le=1e9)  # promote.metric, absolute, on one evaluate.slices value
    # no answer in this long rejects the challenger; minutes, fractions too (0.5: thirty seconds)
    approval_timeout_min: float = Field(default=1440, gt=0, le=43_200)

    @model_validator(mode="after")
    def _approval_above_gate(self) -> PromoteConfig:
        if self.approval_max_p_value < self.max_p_value:
            raise ValueError(f"promote.approval_max_p_value {self.approval_max_p_value} is below promote.max_p_value "
                             f"{self.max_p_value}: the borderline p-values lie between the two; raise it")
        return self


class StudentConfig(_Strict):
    kind: Literal["lightgbm", "mlp"] = "lightgbm"
    # lightgbm: at most this many trees, pruned to the fewest that keep
    n_estimators: int = Field(default=100, ge=1, le=100_000)
    num_leaves: int = Field(default=15, ge=2, le=131_072)  #   the metric on the validation rows
    learning_rate: float = Field(default=0.1, gt=0, le=10)
    hidden: list[int] = [32]  # mlp: its layers
    epochs: int = Field(default=30, ge=1, le=10_000)


class CompressConfig(_Strict):
    student: StudentConfig = StudentConfig()
    augment_factor: float = Field(default=1.0, ge=0, le=20)  # augmented rows per training row, labelled by the ensemble
    swap_share: float = Field(default=0.2, ge=0, le=1)  # share of an augmented row's columns taken from another row
    # trees are cut while the validation metric loses at most this
    prune_tolerance: float = Field(default=0.001, ge=0, le=1e9)
    quantize: bool = True  # an int8 candidate of the ensemble (its MLP's Linear layers), when it has an MLP
    # a candidate may lose this much promote.metric (absolute)
    max_metric_loss: float = Field(default=0.005, ge=0, le=1e9)
    # ... and must be this many times faster on one row, to be served
    min_speedup: float = Field(default=2.0, ge=1, le=1000)
    # auto: passing candidates this close to the fastest one's single-row CPU time count as tied (smallest on disk)
    tie_margin: float = Field(default=0.15, ge=0, le=10)
    # single-row predictions timed per candidate (p50, p99), at most one per test row (at least 20)
    latency_rows: int = Field(default=200, ge=20, le=100_000)
    measure_memory: bool = True  # peak memory of each candidate, in one fresh interpreter forked per candidate


class CostConfig(_Strict):
    # Defaults: AWS on-demand list prices, us-east-1 (2024): m7i.large, 2 vCPUs for $0.1008/h, so $0.0504 per
    # CPU-hour; p4d.24xlarge, 8 A100 GPUs for $32.77/h, so $4.10 per GPU-hour. Set your own.
    cpu_hour_usd: float = Field(default=0.0504, ge=0, le=10_000)
    gpu_hour_usd: float = Field(default=4.10, ge=0, le=10_000)


class ReportConfig(_Strict):
    current: Literal["batch", "prediction_log"] = "batch"  # what is compared with the champion's reference
    window_hours: float = Field(default=24, gt=0, le=8784)  # prediction_log: the newest this many hours of predictions
    # training rows kept with a model as its drift reference
    reference_rows: int = Field(default=20_000, ge=100, le=100_000_000)
    drift_share_threshold: float = Field(gt=0, le=1)
    prediction_drift_threshold: float = Field(default=0.1, gt=0, le=1e6)  # normed Wasserstein distance of probabilities
    # promote.metric on labelled rows this far under the champion's
    max_metric_drop: float = Field(default=0.03, ge=0, le=1e9)
    min_labeled_rows: int = Field(default=200, ge=10, le=1_000_000_000)  # fewer labelled rows: no performance verdict
    max_p_value: float = Field(default=0.05, gt=0, le=1)  # bootstrap: the decay must be this significant
    max_key_share: float = Field(default=1.0, gt=0, le=1)  # prediction_log: one API key's most share of the window
    # the current rows judged: a seeded sample of this many;
    max_rows: int | None = Field(default=None, ge=100, le=1_000_000_000)
    #   null: all of them
    # 1 - NDCG of the champion's top columns by mean |contribution|, current against reference, at which to retrain
    attribution_drift_threshold: float = Field(default=0.15, gt=0, le=1)
    explain_rows: int = Field(default=500, ge=50, le=1_000_000)  # rows explained on each side for attribution drift


class DeployConfig(_Strict):
    endpoint: str | None = None  # a running `amaas serve` to check (http://host:port); null: build the bento only
    timeout_s: float = Field(default=60, gt=0, le=86_400)  # how long the endpoint has to serve the new champion
    rollback_on_failure: bool = True  # the endpoint never served it: return the registry to the previous champion

    @field_validator("endpoint")
    @classmethod
    def _http_only(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"{value!r} is not an http(s) URL: deploy polls <endpoint>/models over HTTP, so give "
                             f"the address of a running `amaas serve` (http://host:port), or null to only build "
                             f"the bento")
        if value is not None and not urlsplit(value).netloc:
            raise ValueError(f"{value!r} names no host: write http://host:port")
        return value


def webhook_problem(url: str) -> str | None:
    """Why `url` cannot take alerts (only an http(s) URL with a host can), or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return (f"an alert webhook must be an http:// or https:// URL with a host, not one of scheme "
                f"{parts.scheme or 'none'!r}")
    return None


class AlertsConfig(_Strict):
    webhook_url: str | None = None  # $AMAAS_ALERT_WEBHOOK overrides it
    timeout_s: float = Field(default=5, gt=0, le=600)
    retries: int = Field(default=2, ge=0, le=20)
    smtp_host: str | None = None
    smtp_port: int = Field(default=25, ge=1, le=65535)
    email_from: str = "amaas@localhost"
    email_to: list[str] = []

    @field_validator("webhook_url")
    @classmethod
    def _http_webhook(cls, value: str | None) -> str | None:
        if value is not None and (problem := webhook_problem(value)):
            raise ValueError(problem)
        return value


class ABTestConfig(_Strict):
    """The A/B test of a canary (pipelines/abtest.py): when the challenger's live results make a verdict."""

    min_effect: float = Field(default=0.02, gt=0, le=1e9)  # the smallest difference in promote.metric worth detecting
    power: float = Field(default=0.8, gt=0, lt=1)  # the chance to detect a difference of min_effect
    sided: Literal["two-sided", "one-sided"] = "two-sided"  # each direction at alpha/2 | at alpha
    # labelled rows each route needs at least, whatever the power says
    min_rows: int = Field(default=200, ge=10, le=1_000_000_000)
    cooldown_h: float = Field(default=24, ge=0, le=8784)  # canary_policy auto: no new decision within this many hours


class RateLimitConfig(_Strict):
    # requests/s per key (token bucket refill); null: no rate limit
    rps: float | None = Field(default=None, gt=0, le=1e6)
    # the bucket: requests a key may send at once before rps applies
    burst: int = Field(default=100, ge=1, le=1_000_000)
    daily_quota: int | None = Field(default=None, ge=1, le=10**12)  # rows per key per UTC day; null: no quota


class BlueGreenConfig(_Strict):
    # the front answers 502 when a backend does not accept sooner
    connect_timeout_s: float = Field(default=1.0, gt=0, le=600)
    read_timeout_s: float = Field(default=60.0, gt=0, le=3600)  # ... and 504 when it does not answer sooner
    # the old backend's requests in flight finish within this, then it stops
    drain_s: float = Field(default=30.0, gt=0, le=3600)


class CacheConfig(_Strict):
    size: int = Field(default=0, ge=0, le=10_000_000)  # answers kept per worker process (LRU); 0: no cache


class ServeConfig(_Strict):
    host: str
    port: int = Field(ge=1, le=65535)
    batching: bool = True  # adaptive batching; false scores each request on its own
    max_batch_size: int = Field(ge=2, le=100_000)  # BentoML's lower bound for a batchable API
    max_latency_ms: int = Field(ge=1, le=60_000)
    auth: bool = True  # API keys required on /predict (health, metrics and docs stay open)
    # rows in one request; more is 413 (batching: <= max_batch_size)
    max_rows: int = Field(default=256, ge=1, le=100_000)
    max_body_bytes: int = Field(default=1_000_000, ge=1024, le=1_000_000_000)  # request body size; more is 413
    canary_share: float = Field(default=0.0, ge=0, le=1)  # share of requests the challenger answers
    shadow: bool = False  # score every request with the challenger too, answer with the champion
    canary_policy: Literal["manual", "auto"] = "manual"  # auto: a winning challenger is promoted, a losing one ends
    ab_test: ABTestConfig = ABTestConfig()  # the canary's verdict: reports/ab_test.json, `amaas ab-report`
    model: Literal["auto", "ensemble", "student", "quantized"] = "auto"  # what the compress stage sends on to serve
    reload_interval_s: float = Field(default=2.0, gt=0, le=1e9)  # how often a server checks the registry aliases
    keep_alive_s: int = Field(default=5, ge=1, le=3600)  # an idle keep-alive connection is closed after this
    # the gateway: worker processes, and per-key limits that hold across them (`amaas keys add --rps` overrides)
    workers: int = Field(default=1, ge=1, le=256)  # BentoML worker processes of the service (each loads the models)
    rate_limit: RateLimitConfig = RateLimitConfig()
    # hot: one bento follows the registry; blue-green: a front on `port` forwards to one of two bentos, and
    # `amaas deploy` starts the new champion beside the old one and switches once it answers
    strategy: Literal["hot", "blue-green"] = "hot"
    blue_green: BlueGreenConfig = BlueGreenConfig()
    cache: CacheConfig = CacheConfig()  # the response cache

    @model_validator(mode="after")
    def _request_fits_a_batch(self) -> ServeConfig:
        """With batching, BentoML cuts a request of more rows than max_batch_size into several model calls, and
        sheds the whole request (503) once its later parts wait past max_latency_ms: a request the limits allow
        must fit one model call."""
        if self.batching and self.max_rows > self.max_batch_size:
            raise ValueError(f"serve.max_rows ({self.max_rows}) is more than serve.max_batch_size "
                             f"({self.max_batch_size}): with batching, such a request is split into several model "
                             f"calls and shed (503) once it waits past serve.max_latency_ms; set max_rows <= "
                             f"max_batch_size (or raise max_batch_size)")
        return self


class PipelineConfig(_Strict):
    lock_timeout_s: float = Field(ge=0)
    owner: str = Field(default="amaas", min_length=1, max_length=100)  # the DAGs' owner in the Airflow UI
    # what starts training_pipeline besides its schedule: monitoring's trigger (dag) or its "retrain needed" asset
    training_trigger: Literal["dag", "asset"] = "dag"


class ScaleConfig(_Strict):
    dask_scheduler: str | None = None  # null: this process; "local": a LocalCluster; or tcp://host:8786
    dask_workers: int = Field(default=2, ge=1, le=1024)  # worker processes of the "local" cluster
    score_chunk_rows: int = Field(ge=1, le=100_000_000)


STATE_URL_ENV = "AMAAS_STATE_URL"  # PostgreSQL: keys, usage, registry, routing and drain flags, prediction log
REDIS_URL_ENV = "AMAAS_REDIS_URL"  # Redis: the per-key token buckets
ARTIFACTS_URL_ENV = "AMAAS_ARTIFACTS_URL"  # where bentos are put and fetched: a folder, file:// or s3:// URL


class StateConfig(_Strict):
    """Where what several servers share lives: null everywhere is one host (files and SQLite beside the project).
    Each environment variable wins over its key (keep passwords out of git: set the variables)."""

    url: str | None = None  # postgresql://user:password@host:5432/db ($AMAAS_STATE_URL)
    redis_url: str | None = None  # redis://host:6379/0 ($AMAAS_REDIS_URL); null: buckets in the state database
    artifacts_url: str | None = None  # /shared/folder, file:///..., s3://bucket/prefix ($AMAAS_ARTIFACTS_URL)

    @field_validator("url", "redis_url")
    @classmethod
    def _no_password(cls, value: str | None, info: ValidationInfo) -> str | None:
        if password_in(value) and not (info.context or {}).get("from_env"):
            raise ValueError("holds a password: params.yaml is committed (and copied into every bento); leave it "
                             "null here and set $AMAAS_STATE_URL / $AMAAS_REDIS_URL instead")
        return value

    @field_validator("url")
    @classmethod
    def _postgres(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
            raise ValueError(f"{urlsplit(value).scheme or 'no scheme'}: not a PostgreSQL URL: give "
                             f"postgresql://user@host:5432/db (the password in $AMAAS_STATE_URL), or null for the "
                             f"one-host files")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{urlsplit(value).scheme or 'no scheme'}: not a Redis URL: give redis://host:6379/0, "
                             f"or null")
        return value

    @field_validator("artifacts_url")
    @classmethod
    def _artifacts(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("", "file", "s3"):
            raise ValueError(f"{value!r}: the artifacts store is a folder, a file:// or an s3:// URL")
        return value

    def resolved(self) -> StateConfig:
        """These settings with the environment's overrides applied ($AMAAS_STATE_URL, ...), checked again."""
        env = {"url": os.environ.get(STATE_URL_ENV), "redis_url": os.environ.get(REDIS_URL_ENV),
               "artifacts_url": os.environ.get(ARTIFACTS_URL_ENV)}
        return StateConfig.model_validate({**self.model_dump(), **{k: v for k, v in env.items() if v}},
                                          context={"from_env": True})


class Settings(_Strict):
    seed: int
    pipeline: PipelineConfig
    source: SourceConfig
    schema_: SchemaConfig = Field(alias="schema")
    validate_: ValidateConfig = Field(alias="validate")
    clean: CleanConfig
    prepare: PrepareConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    compress: CompressConfig = CompressConfig()
    cost: CostConfig = CostConfig()
    promote: PromoteConfig
    report: ReportConfig
    alerts: AlertsConfig = AlertsConfig()
    serve: ServeConfig
    deploy: DeployConfig = DeployConfig()
    scale: ScaleConfig
    state: StateConfig = StateConfig()

    @property
    def data_schema(self) -> SchemaConfig:
        return self.schema_

    @property
    def validation(self) -> ValidateConfig:
        return self.validate_

    @property
    def watermark_column(self) -> str | None:
        """What collect is incremental on: source.watermark_column, else the time column, else (sql and the
        simulator) the id column; None (a files source with no time column): each new file is a batch."""
        if self.source.watermark_column or self.schema_.time_column:
            return self.source.watermark_column or self.schema_.time_column
        return None if self.source.kind == "files" else self.schema_.id_column

    @model_validator(mode="after")
    def _slices_known(self) -> Settings:
        unknown = [c for c in self.evaluate.slices if c not in self.schema_.categorical]
        if unknown:
            raise ValueError(f"evaluate.slices {unknown} are not categorical columns of the schema "
                             f"({', '.join(self.schema_.categorical)})")
        return self

    @model_validator(mode="after")
    def _watermark_known(self) -> Settings:
        if self.source.watermark_column is not None and self.source.watermark_column not in (
                self.schema_.id_column, self.schema_.time_column):
            raise ValueError(f"source.watermark_column {self.source.watermark_column!r} must be the schema's "
                             f"id_column or time_column")
        if self.watermark_column is None and self.source.kind != "files":
            raise ValueError(f"source {self.source.kind} needs a watermark to collect incrementally: set "
                             f"schema.time_column or an increasing schema.id_column")
        return self

    @model_validator(mode="after")
    def _metric_fits_task(self) -> Settings:
        task, metric = self.schema_.task, self.promote.metric
        if metric not in TASK_METRICS[task]:
            raise ValueError(f"promote.metric {metric} does not apply to task {task}: use one of "
                             f"{', '.join(TASK_METRICS[task])}")
        if self.schema_.task != "binary" and self.evaluate.threshold == "auto":
            raise ValueError("evaluate.threshold: auto applies to task binary only; set it to 0.5")
        if self.prepare.split == "time" and self.schema_.time_column is None:
            raise ValueError("prepare.split: time needs schema.time_column; set prepare.split: random")
        return self


def _format_errors(exc: ValidationError, path: Path) -> str:
    lines = [f"{path} has {exc.error_count()} invalid setting(s):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        got = err.get("input")
        if err["type"] == "missing":
            fix = "add this key (see the shipped params.yaml for an example)"
        elif err["type"] == "extra_forbidden":
            fix = "remove it or fix its spelling"
        else:
            fix = f"got {_shown(got)}; change it"
        lines.append(f"  - {key}: {err['msg']} -> {fix}")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    """A refused value as an error shows it: a scalar, clipped; never a password; a whole section by its keys only
    (a check of the whole file would otherwise print all of it)."""
    if isinstance(value, dict):
        return f"a section with keys {', '.join(map(str, list(value)[:12]))}" + (", ..." if len(value) > 12 else "")
    if isinstance(value, (list, tuple)) and len(repr(value)) > 100:
        return f"a list of {len(value)} items"
    if isinstance(value, str) and password_in(value):
        return "a URL with a password (not shown)"
    text = repr(value)
    return text if len(text) <= 100 else text[:100] + f"... ({len(text)} characters)"


def load_settings(path: str | Path | None = None) -> Settings:
    """Load and validate params.yaml (default: $AMAAS_PARAMS, else ./params.yaml)."""
    path = Path(path or os.environ.get(PARAMS_ENV) or "params.yaml")
    if not path.is_file():
        raise ConfigError(f"settings file {path} not found: run from the project root or set {PARAMS_ENV}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a YAML mapping of settings, got {type(raw).__name__}")
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, path)) from None


@dataclass(frozen=True)
class Paths:
    """Where every stage reads and writes, relative to one project root: each artifact's name, spelled once.

    The stage declarations (pipelines/contracts.py) name their inputs and outputs by these properties."""

    root: Path
    # a seeded sample of the rows of the training period as the table has them (copies of other rows included):
    # the data drift reference
    SAMPLE_FILE: ClassVar[str] = "train_sample.parquet"
    # id, actual, prediction on the newest rows as the table has them (recent_rows): the prediction drift reference
    TEST_PREDICTIONS_FILE: ClassVar[str] = "test_predictions.parquet"
    MODEL_CARD_FILE: ClassVar[str] = "MODEL_CARD.md"  # a registered version's card, in its folder
    MODEL_CARD_HTML_FILE: ClassVar[str] = "MODEL_CARD.html"  # the same card as one self-contained page

    @classmethod
    def from_env(cls) -> Paths:
        return cls(Path(os.environ.get(ROOT_ENV) or Path.cwd()).resolve())

    def resolve(self, path: str) -> Path:
        """A path from params.yaml: relative ones are taken from the project root."""
        return self.root / Path(path).expanduser()

    # data/: DVC-versioned tables
    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def raw_manifest(self) -> Path:
        return self.raw / "manifest.json"

    @property
    def validated(self) -> Path:
        return self.root / "data" / "validated"

    @property
    def validated_rows(self) -> Path:
        return self.validated / "data.parquet"

    @property
    def quarantine(self) -> Path:
        return self.root / "data" / "quarantine"

    @property
    def quarantined_rows(self) -> Path:
        return self.quarantine / "quarantine.parquet"

    @property
    def features(self) -> Path:
        return self.root / "data" / "features"

    @property
    def reference(self) -> Path:
        return self.root / "data" / "reference"

    def split_rows(self, split: str) -> Path:
        """The rows of a split (train, valid, test) as validated."""
        return self.reference / f"{split}.parquet"

    def split_features(self, split: str) -> Path:
        """The rows of a split as the fitted transform makes them."""
        return self.features / f"{split}.parquet"

    @property
    def fitted_transform(self) -> Path:
        return self.features / "transform.json"

    @property
    def train_rows(self) -> Path:
        return self.split_rows("train")

    @property
    def test_rows(self) -> Path:
        return self.split_rows("test")

    @property
    def train_sample(self) -> Path:
        return self.reference / self.SAMPLE_FILE

    @property
    def recent_rows(self) -> Path:
        """The newest rows as the table has them, copies of training rows included (the test rows where no
        identical rows moved): drawn like the batches to come, what prediction drift compares them with."""
        return self.reference / "recent.parquet"

    @property
    def expectations(self) -> Path:
        return self.root / "expectations"

    # models/
    @property
    def trained(self) -> Path:
        """train's ensemble, before compression."""
        return self.root / "models" / "trained"

    @property
    def challenger(self) -> Path:
        """What challenges the champion: the compress stage's pick of the ensemble, its student or int8 copy."""
        return self.root / "models" / "challenger"

    @property
    def tuning_studies(self) -> Path:
        """The Optuna studies of train.tuning (SQLite): a rerun with the same inputs resumes its study."""
        return self.root / "models" / "tuning" / "optuna.db"

    @property
    def registry(self) -> Path:
        return self.root / "models" / "registry"

    @property
    def registry_aliases(self) -> Path:
        return self.registry / "aliases.json"

    @property
    def package_record(self) -> Path:
        return self.root / "models" / "package.json"

    @property
    def deployment(self) -> Path:
        return self.root / "models" / "deployment.json"

    # reports/: metrics (JSON, git-tracked), plots, HTML reports
    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def validation_report(self) -> Path:
        return self.reports / "validation.json"

    @property
    def validation_details(self) -> Path:
        return self.reports / "validation_details.json"

    @property
    def data_docs(self) -> Path:
        return self.reports / "data_docs"

    @property
    def prepare_report(self) -> Path:
        return self.reports / "prepare.json"

    @property
    def train_report(self) -> Path:
        return self.reports / "train.json"

    @property
    def tuning_report(self) -> Path:
        return self.reports / "tuning.json"

    @property
    def tuning_html(self) -> Path:
        """Optuna's optimization history and parameter importances of each tuned learner."""
        return self.reports / "tuning.html"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def slices(self) -> Path:
        return self.reports / "slices.json"

    @property
    def test_predictions(self) -> Path:
        return self.reports / self.TEST_PREDICTIONS_FILE

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def roc_plot(self) -> Path:
        return self.plots / "roc.csv"

    @property
    def pr_plot(self) -> Path:
        return self.plots / "pr.csv"

    @property
    def calibration_plot(self) -> Path:
        return self.plots / "calibration.csv"

    @property
    def confusion_plot(self) -> Path:
        return self.plots / "confusion.csv"

    @property
    def residuals_plot(self) -> Path:
        return self.plots / "residuals.csv"

    @property
    def explain_plot(self) -> Path:
        return self.plots / "explain.csv"

    @property
    def explain_report(self) -> Path:
        return self.reports / "explain.json"

    @property
    def compression_report(self) -> Path:
        return self.reports / "compression.json"

    @property
    def cost_report(self) -> Path:
        return self.reports / "cost.json"

    @property
    def drift_report(self) -> Path:
        return self.reports / "drift.json"

    @property
    def drift_details(self) -> Path:
        return self.reports / "drift_details.json"

    @property
    def drift_html(self) -> Path:
        return self.reports / "drift.html"

    @property
    def prediction_drift_html(self) -> Path:
        return self.reports / "prediction_drift.html"

    @property
    def performance_html(self) -> Path:
        return self.reports / "performance.html"

    @property
    def monitoring_history(self) -> Path:
        return self.reports / "monitoring_history.json"

    @property
    def workspace(self) -> Path:
        """The Evidently workspace every `amaas report` adds its snapshots to; `make monitor` shows it."""
        return self.reports / "workspace"

    @property
    def ab_test(self) -> Path:
        """The A/B test of the canary: champion against challenger on live traffic, and its verdict."""
        return self.reports / "ab_test.json"

    @property
    def promotion(self) -> Path:
        return self.reports / "promotion.json"

    @property
    def model_card(self) -> Path:
        return self.reports / "model_card.md"

    @property
    def model_card_html(self) -> Path:
        return self.reports / "model_card.html"

    # outside the pipeline: keys, the prediction log, BentoML's store
    @property
    def api_keys(self) -> Path:
        return self.root / ".amaas" / "api_keys.json"

    @property
    def prediction_log(self) -> Path:
        return self.root / "logs" / "predictions"

    @property
    def bentoml_home(self) -> Path:
        return self.root / ".bentoml"

    # serve.strategy blue-green: the front's state (the active backend, the last deploy) and deploy's request
    @property
    def front_state(self) -> Path:
        return self.root / ".amaas" / "front.json"

    @property
    def deploy_request(self) -> Path:
        return self.root / ".amaas" / "deploy_request.json"

    @property
    def backend_params(self) -> Path:
        """The settings each blue-green backend was started with (one file per backend colour)."""
        return self.root / ".amaas" / "backends"
