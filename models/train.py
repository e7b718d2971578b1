"""``train_recommender``: a store window in, a trained :class:`Recommender` out.

Two fits (``settings.retrain.refit_full``, on by default):

1. **selection**: train on the earlier part of the window, validate on the last
   ``val_fraction`` (by time); the epoch count is the best epoch by validation AUC (early
   stopping with ``patience`` as usual);
2. **refit**: from scratch (same seed) on the whole window - training *and* validation
   events, vocabularies and like-rate prior included - for exactly that many epochs (the
   learning-rate schedule spans the same ``max_epochs`` as in the selection run, so the
   refit follows the selection run's schedule and stops at the chosen epoch). The newest
   data is then part of the promoted model, not only of its model selection.

With ``refit_full`` off the selection run's best weights are returned (as before). The
encoder pass is shared: in frozen mode the text vectors are encoded once for both fits;
in fine-tuning modes the encoder's initial weights are restored before the refit.

Features use the label delay ``settings.feature_lag`` (``models.features``): an example at
time t only sees events older than t - lag, as a server does.

The window's point-in-time features and the frozen encoder's catalog pass run on the engine
``settings.services.engine`` names (:mod:`models.engine`): plain pandas in this process by default, Ray
tasks on a cluster with ``"ray"`` (same results). Fine-tuned encoders are never sent to Ray: the tasks load
the encoder's pretrained weights from its local path.

The Lightning ``Trainer`` gets ``precision`` / ``accelerator`` / ``devices`` / ``strategy``
from ``settings.training``; it writes nothing into the working directory (no loggers,
no progress bars, its root is a temporary folder). The best weights by validation AUC
are exported as safetensors by :class:`BestWeights` (Lightning's ``ModelCheckpoint``
writes pickled ``.ckpt`` files, which this project never loads), together with the
per-epoch history, so that spawned DDP workers hand them back through files; the refit's
final weights travel the same way (:class:`FinalWeights`).
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping

from models import _quiet  # noqa: F401  (before lightning is imported)
from models.baselines import torch_threads
from models.cf import CF_BLOCK_ROWS, CF_COLUMNS, CollabModel, category_counts, text_similarity
from models.data import ItemIndex, RecDataModule
from models.engine import PandasEngine, feature_engine
from models.features import WIDE_COLUMNS
from models.module import RecommenderModule, batch_logits, batch_queries
from models.network import TextEncoder, TextSource, TwoTowerWide, default_encoder_path, parse_mode
from models.ranker import BLEND_COLUMNS, FUSION_COLUMNS, MIN_ROWS, Ranker, ranker_matrix
from models.recommender import Recommender, _cosine, model_config
from recloop.memory import PhasePeaks


@dataclass
class TrainedModel:
    model: Recommender
    history: list[dict] = field(default_factory=list)  # one dict per epoch: epoch, train_loss, val_loss, val_auc
    seconds: float = 0.0
    n_train: int = 0
    n_val: int = 0
    best_val_auc: float | None = None  # of the selection run
    train_start: pd.Timestamp | None = None  # the first event the model depends on
    train_end: pd.Timestamp | None = None  # the newest event it depends on (fit or epoch selection)
    timings: dict = field(default_factory=dict)  # seconds per phase: features, encode, fit[, refit_features, refit]
    peak_mib: dict = field(default_factory=dict)  # peak RSS per phase, same names (recloop.memory.PhasePeaks)
    epochs_chosen: int = 0  # best epoch (1-based) of the selection run: the refit's epoch count
    refit_full: bool = False  # the model was refit on train + validation
    feature_lag: pd.Timedelta = field(default_factory=lambda: pd.Timedelta(0))
    ranker: dict | None = None  # the second stage: kind, rows it was fitted on, their AUC (towers vs ranker)


class BestWeights(Callback):
    """Keep the best trainable weights by ``monitor`` and export them as safetensors."""

    def __init__(self, directory: Path, monitor: str = "val_auc"):
        self.directory = Path(directory)
        self.monitor = monitor
        self.best: float | None = None
        self.history: list[dict] = []

    @property
    def weights_path(self) -> Path:
        return self.directory / "best.safetensors"

    @property
    def history_path(self) -> Path:
        return self.directory / "history.json"

    @staticmethod
    def _metrics(trainer: pl.Trainer) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: RecommenderModule) -> None:
        # runs after the epoch's validation: both train and validation metrics are there
        metrics = self._metrics(trainer)
        self.history.append({"epoch": int(trainer.current_epoch),
                             **{k: metrics[k] for k in ("train_loss", "val_loss", "val_auc") if k in metrics}})
        if trainer.is_global_zero:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.history_path.write_text(json.dumps(self.history), encoding="utf-8")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: RecommenderModule) -> None:
        if trainer.sanity_checking:
            return
        value = self._metrics(trainer).get(self.monitor)
        if value is None or (self.best is not None and value <= self.best):
            return
        self.best = value
        if trainer.is_global_zero:
            from safetensors.torch import save_file

            self.directory.mkdir(parents=True, exist_ok=True)
            save_file(trainable_state(pl_module), str(self.weights_path), metadata={self.monitor: str(value)})


class FinalWeights(Callback):
    """The refit: stop after ``stop_after`` epochs and export the final trainable weights as safetensors.

    The Trainer runs with the selection run's ``max_epochs`` (so the learning-rate schedule is the
    same) and this callback ends it at the chosen epoch.
    """

    def __init__(self, directory: Path, stop_after: int):
        self.directory = Path(directory)
        self.stop_after = int(stop_after)
        self.epochs = 0

    @property
    def weights_path(self) -> Path:
        return self.directory / "final.safetensors"

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: RecommenderModule) -> None:
        self.epochs = int(trainer.current_epoch) + 1
        if self.epochs >= self.stop_after:
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: RecommenderModule) -> None:
        if trainer.is_global_zero:
            from safetensors.torch import save_file

            self.directory.mkdir(parents=True, exist_ok=True)
            save_file(trainable_state(pl_module), str(self.weights_path), metadata={"epochs": str(self.epochs)})


def trainable_state(module: RecommenderModule) -> dict[str, torch.Tensor]:
    """Heads always; the encoder's weights too when the mode fine-tunes it."""
    state = {f"net.{k}": v for k, v in module.net.state_dict().items()}
    if module.texts.trains_encoder:
        state.update({f"encoder.{k}": v for k, v in module.texts.encoder.model.state_dict().items()})
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def load_trainable_state(module: RecommenderModule, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    module.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    enc = {k[8:]: v for k, v in state.items() if k.startswith("encoder.")}
    if enc:
        module.texts.encoder.model.load_state_dict(enc)


def _quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*Trying to infer the `batch_size`.*")
    # the frozen encoder / transformers modules are in eval mode on purpose (see RecommenderModule)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def _chosen_epochs(history: list[dict]) -> tuple[int, float | None]:
    """(epochs to refit for, best validation AUC): the first epoch with the highest val AUC
    (the one :class:`BestWeights` keeps); without any val AUC, the epochs that ran."""
    aucs = [(h["val_auc"], h.get("epoch", k)) for k, h in enumerate(history) if "val_auc" in h]
    if not aucs:
        return max(len(history), 1), None
    best = max(a for a, _ in aucs)
    epoch = next(e for a, e in aucs if a == best)
    return int(epoch) + 1, float(best)


@torch.no_grad()
def tower_scores(module: RecommenderModule, tensors: dict, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(logit, cosine) of the towers for prepared example ``tensors`` (eval mode, no grad, on CPU)."""
    module = module.cpu().eval()
    net, texts = module.net, module.texts
    n = int(tensors["user"].shape[0])
    logit, cos = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        user, item, hist, query, wide = (tensors[k][sl] for k in ("user", "item", "hist", "query", "wide"))
        item_vecs, item_ids, target_pos, hist_pos = batch_logits(net, texts, module.item_vocab_of_index,
                                                                 user, item, hist, query)
        qv, has = batch_queries(texts, query)
        items = net.item_vectors(item_vecs.float(), item_ids)
        users = net.user_vectors(items, hist_pos, user, None if qv is None else qv.float(), has)
        it = items[target_pos]
        logit[sl] = net.head(users, it, wide).numpy()
        cos[sl] = _cosine(users, it).numpy()
    return logit, cos


def collab_features(collab: CollabModel, rows: pd.DataFrame, history: pd.DataFrame, catalog: pd.DataFrame,
                    items: ItemIndex, tensors: dict, item_vecs: np.ndarray, prior: float, lag) -> np.ndarray:
    """``CF_COLUMNS`` of prepared rows (point-in-time with ``lag``: their history and category counts), a
    block of ``CF_BLOCK_ROWS`` rows at a time (the users' recent events are [rows, KNN_HISTORY] there)."""
    pos_map = collab.index_of(items.item_ids)
    hist = tensors["hist"].numpy()
    hist_cf = np.where(hist >= 0, pos_map[np.maximum(hist, 0)], -1) if len(pos_map) else np.full_like(hist, -1)
    target = tensors["item"].numpy()
    wide = tensors["wide"].numpy()
    cat_n, cat_pos = category_counts(rows, history, catalog, lag)
    uniq, inv = np.unique(target, return_inverse=True)
    text_prior = collab.text_prior(item_vecs[uniq])[inv]
    out = np.empty((len(target), len(CF_COLUMNS)), dtype=np.float32)
    for s in range(0, len(target), CF_BLOCK_ROWS):
        b = slice(s, s + CF_BLOCK_ROWS)
        recent, labels = tensors["recent"][b].dense()
        recent_cf = np.where(recent >= 0, pos_map[np.maximum(recent, 0)], -1) if len(pos_map) else \
            np.full_like(recent, -1)
        out[b] = collab.features(hist_cf[b], pos_map[target[b]], cat_n[b], cat_pos[b], text_prior[b], prior, wide[b],
                                 recent_cf, labels, text_similarity(item_vecs, target[b], recent))
    return out


FUSION_CHUNKS = 4  # time chunks of a part: chunk j's rows get collaborative counts fitted on chunks < j


def fusion_rows(events: pd.DataFrame, tensors: dict, history: pd.DataFrame, catalog: pd.DataFrame,
                items: ItemIndex, item_vecs: np.ndarray, prior: float, lag,
                chunks: int = FUSION_CHUNKS) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-sample rows for the fusion model from a time-ordered part (``events`` with its prepared
    ``tensors``): split into ``chunks`` by time; the rows of chunk j >= 1 get ``CF_COLUMNS`` from a
    :class:`CollabModel` fitted on chunks < j only (an expanding window), and their point-in-time wide
    statistics (the lag). No row's label reaches its own features; every chunk but the first is used.
    Returns ([n, len(FUSION_COLUMNS)] float32, [n] labels)."""
    n = len(events)
    bounds = np.linspace(0, n, chunks + 1).round().astype(int)
    wide, labels = tensors["wide"].numpy(), tensors["label"].numpy().astype(np.int64)
    lookup = _text_lookup(items, item_vecs)
    xs, ys = [], []
    for j in range(1, chunks):
        a, b = int(bounds[j]), int(bounds[j + 1])
        if a == 0 or b <= a:
            continue
        fit = events.iloc[:a]
        collab = CollabModel.fit(fit, lookup, float(fit["label"].mean()), wide[:a])
        part = {k: v[a:b] for k, v in tensors.items()}
        cf = collab_features(collab, events.iloc[a:b], history, catalog, items, part, item_vecs, prior, lag)
        xs.append(np.concatenate([wide[a:b], cf], axis=1).astype(np.float32))
        ys.append(labels[a:b])
    if not xs:
        return np.empty((0, len(FUSION_COLUMNS)), dtype=np.float32), np.empty(0, dtype=np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def fit_ranker(module: RecommenderModule, dm: RecDataModule, catalog: pd.DataFrame, item_vecs: np.ndarray,
               kind: str, seed: int, lag, columns=None, towers: bool = True) -> tuple[Ranker | None, dict | None]:
    """Stacking in two steps (no row sees its own label, no model scores rows it was fitted on):

    1. the **fusion** model (``kind`` over ``FUSION_COLUMNS``: wide statistics + collaborative
       features) on the selection train part's rows, chunk by chunk (:func:`fusion_rows`);
    2. the **blend** on the validation part: a logistic regression of the label on [fusion logit,
       tower logit, tower cosine] - the towers of the selection run (trained on the train part) and
       collaborative counts fitted on the whole train part.

    ``columns``: the fusion model's inputs (a subset of ``FUSION_COLUMNS``; None = all); ``towers=False``:
    the blend is the fusion logit alone (ablations). (None, None) when the train part or the validation
    part has too few rows or a single class."""
    from models.evaluate import auc

    x, y = fusion_rows(dm.train_events, dm.tensors["train"], dm.events, catalog, dm.items, item_vecs, dm.prior, lag)
    val = dm.tensors["val"]
    yv = val["label"].numpy().astype(np.int64)
    if len(y) < MIN_ROWS or len(np.unique(y)) < 2 or len(yv) < MIN_ROWS or len(np.unique(yv)) < 2:
        return None, None
    columns = tuple(columns or FUSION_COLUMNS)
    unknown = set(columns) - set(FUSION_COLUMNS)
    if unknown:
        raise ValueError(f"unknown fusion columns {sorted(unknown)}; choose from {list(FUSION_COLUMNS)}")
    pick = [FUSION_COLUMNS.index(c) for c in columns]
    fusion = Ranker.fit(x[:, pick], y, kind, seed=seed, columns=columns)
    collab = CollabModel.fit(dm.train_events, _text_lookup(dm.items, item_vecs), dm.prior, dm.train_wide)
    logit, cos = tower_scores(module, val)
    cf = collab_features(collab, dm.val_events, dm.events, catalog, dm.items, val, item_vecs, dm.prior, lag)
    xv = np.concatenate([val["wide"].numpy(), cf], axis=1)
    fusion.fit_blend(xv[:, pick], logit, cos, yv, towers=towers)
    full = ranker_matrix(logit, cos, val["wide"].numpy(), cf)
    info = {"kind": kind, "n_rows": len(y), "rows": f"train part, {FUSION_CHUNKS} time chunks (expanding window)",
            "blend_rows": len(yv), "val_auc_towers": auc(yv, logit),
            "val_auc_fusion": auc(yv, fusion._base_logit(xv[:, pick])),
            "val_auc_blend": auc(yv, fusion.logit(full)),  # blend weights fitted on these rows (3 coefficients)
            "blend": dict(zip(BLEND_COLUMNS, map(float, fusion.blend["coef"]))),
            **{k: v for k, v in fusion.info.items() if k != "n_rows"},
            "importance": {k: round(v, 4) for k, v in fusion.importance().items()}}
    fusion.info = info
    return fusion, info


def _text_lookup(items: ItemIndex, vecs: np.ndarray):
    return lambda ids: vecs[[items.position[str(i)] for i in ids]]


def _new_module(cfg, encoder: TextEncoder, texts: TextSource, dm: RecDataModule) -> RecommenderModule:
    net = TwoTowerWide(encoder.dim, cfg.embed_dim, len(dm.user_vocab), len(dm.item_vocab), len(WIDE_COLUMNS),
                       cfg.id_embeddings, cfg.id_dropout)
    net.set_wide_stats(dm.train_wide)
    return RecommenderModule(net, texts, dm.item_vocab_of_index, cfg.lr_heads, cfg.lr_encoder,
                             cfg.weight_decay, cfg.warmup_steps)


def _fit(cfg, kind: str, module: RecommenderModule, dm: RecDataModule, callbacks: list[Callback], root: Path,
         max_epochs: int, fast_dev_run, progress_bar: bool, validate: bool = True) -> None:
    on_cpu = cfg.accelerator == "cpu" or not torch.cuda.is_available()
    # the frozen-mode step is many small ops: on a shared 2-core box one thread is several
    # times faster than two spin-waiting ones (the encoder pass used all cores)
    threads = (cfg.fit_threads or (1 if kind == "frozen" else 0)) if on_cpu else 0
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator=cfg.accelerator, devices=cfg.devices,
        strategy=cfg.strategy, precision=cfg.precision, deterministic=True if on_cpu else "warn",
        logger=False, enable_checkpointing=False, enable_progress_bar=progress_bar,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root),
        callbacks=callbacks, fast_dev_run=fast_dev_run, log_every_n_steps=10,
        **({} if validate else {"limit_val_batches": 0}))
    with torch_threads(threads), warnings.catch_warnings():
        if not validate:  # fast_dev_run overrides limit_val_batches: the empty val loader is on purpose
            warnings.filterwarnings("ignore", message=r".*across ranks is zero.*")
        trainer.fit(module, datamodule=dm)


def train_recommender(settings, events: pd.DataFrame, catalog: pd.DataFrame, users: pd.DataFrame | None = None,
                      *, fast_dev_run: bool | int = False, max_epochs: int | None = None,
                      progress_bar: bool = False, run_dir: str | Path | None = None,
                      callbacks: list[Callback] | None = None, refit_full: bool | None = None,
                      ranker: str | None = None, engine=None) -> TrainedModel:
    """Train on ``events`` (a store window): choose the epoch count on the validation part, then
    (``refit_full``, default ``settings.retrain.refit_full``) refit on the whole window; see the module doc.

    ``ranker`` ("lightgbm" | "logistic" | "none"; None = ``settings.training.ranker``): the second stage
    (:mod:`models.ranker`), fitted by
    stacking on the validation part with the selection run's towers; skipped (the towers score
    alone) without one or with fewer than ``MIN_ROWS`` validation rows or a single class there.

    ``callbacks`` are added to both fits (the refit has no validation). ``users`` is accepted
    for the contract but never used as model input: group attributes are for fairness evaluation only.
    ``engine``: where the window's features and the catalog pass run (default: ``feature_engine(settings)``,
    stopped at the end when it started a local Ray instance).
    """
    own = engine is None
    engine = feature_engine(settings) if own else engine
    try:
        return _train(settings, events, catalog, engine, fast_dev_run=fast_dev_run, max_epochs=max_epochs,
                      progress_bar=progress_bar, run_dir=run_dir, callbacks=callbacks, refit_full=refit_full,
                      ranker=ranker)
    finally:
        if own:
            engine.close()


def _config(cfg, encoder: TextEncoder, encoder_path: Path, dm: RecDataModule, final_dm: RecDataModule,
            history: list[dict], best_auc: float | None, epochs_chosen: int, refit: bool, lag,
            ranker_info: dict | None, cold_start_order: str = "model") -> dict:
    """The model's config (``models.recommender.model_config``): architecture, vocabularies of the final
    fit, and the data it depends on (``train_end`` = the newest event used, by the fit or by epoch selection)."""
    val = dm.val_events["timestamp"]
    return model_config(
        encoder_name=str(getattr(encoder.model.config, "_name_or_path", "") or encoder_path.name),
        mode=cfg.mode, text_dim=encoder.dim, embed_dim=cfg.embed_dim,
        user_vocab=sorted(final_dm.user_vocab, key=final_dm.user_vocab.get),
        item_vocab=sorted(final_dm.item_vocab, key=final_dm.item_vocab.get),
        history_len=cfg.history_len, max_text_tokens=cfg.max_text_tokens, prior=final_dm.prior,
        id_embeddings=cfg.id_embeddings, id_dropout=cfg.id_dropout,
        encoder_path=str(encoder_path),
        train_start=str(dm.window_start), train_end=str(dm.window_end), fit_end=str(final_dm.train_end),
        val_start=str(val.min()) if dm.n_val else None, val_end=str(val.max()) if dm.n_val else None,
        n_train=final_dm.n_train, n_val=dm.n_val, n_selection_train=dm.n_train,
        n_query_texts=len(final_dm.query_texts),
        best_val_auc=best_auc, epochs=len(history), epochs_chosen=epochs_chosen, refit_full=refit,
        feature_lag_seconds=float(lag.total_seconds()), seed=cfg.seed, precision=cfg.precision,
        ranker=ranker_info, cold_start_order=cold_start_order)


def _choose_cold_order(settings, module: RecommenderModule, encoder: TextEncoder, encoder_path: Path,
                       texts: TextSource, kind: str, dm: RecDataModule, catalog: pd.DataFrame, vecs: np.ndarray,
                       fitted_ranker: Ranker, ranker_info: dict, history, best_auc, epochs_chosen: int,
                       lag) -> tuple[str, dict]:
    """The cold-start order (``models.cold_start``), judged on the validation part with the selection run's
    model: its towers at the best epoch, its ranker, and collaborative counts of the train part only."""
    from models.cold_start import choose_cold_start_order

    if next(module.parameters()).device.type != "cpu" or encoder.model.device.type != "cpu":
        return "model", {"reason": "trained on an accelerator: the choice runs on CPU only; kept 'model'"}
    was_training = module.training
    module.eval()
    try:
        config = _config(settings.training, encoder, encoder_path, dm, dm, history, best_auc, epochs_chosen, False,
                         lag, ranker_info)
        selection = Recommender(module.net, encoder, config)
        if kind == "frozen":
            selection.remember_texts(dm.items.texts, texts.item_vecs.cpu().numpy())
        selection.collab = CollabModel.fit(dm.train_events, _text_lookup(dm.items, vecs), dm.prior, dm.train_wide)
        selection.ranker = fitted_ranker
        window = pd.concat([dm.train_events, dm.val_events], ignore_index=True)
        val = dm.val_events["timestamp"]
        return choose_cold_start_order(selection, window, catalog, val.min(), val.max(), lag=lag,
                                       k=int(settings.gates.k), candidates=int(settings.serving.candidates),
                                       rescore=int(settings.serving.rescore))
    finally:
        module.train(was_training)


def _refit(cfg, kind: str, events: pd.DataFrame, catalog: pd.DataFrame, engine, dm: RecDataModule,
           encoder: TextEncoder, texts: TextSource, initial_encoder: dict | None, epochs_chosen: int,
           selection_epochs: int, root: Path, callbacks, fast_dev_run, progress_bar: bool, timings: dict,
           peaks: PhasePeaks, t_fit: float) -> tuple[RecommenderModule, RecDataModule]:
    """The refit from scratch on train + validation (new vocabularies, prior, wide statistics; the same
    texts) for the selection run's ``epochs_chosen``: (module with its final weights, its data module).
    Frees the selection run's tensors and frames first; records ``refit_features`` / ``refit`` in
    ``timings`` and ``peaks``."""
    dm.tensors.clear()
    dm.events = dm.train_events = None
    gc.collect()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    final_dm = RecDataModule(events, catalog, cfg.history_len, 0.0, cfg.batch_size, cfg.seed,
                             lag=dm.lag, **_engine_kwargs(engine))
    final_dm.setup("fit")
    if final_dm.items.texts != dm.items.texts or final_dm.query_texts != dm.query_texts:
        raise RuntimeError("the refit's item / query index differs from the selection run's")
    t_feat2 = time.perf_counter()
    peaks.mark("refit_features")
    if initial_encoder is not None:  # fine-tuning changed the encoder in place: start from its initial weights
        encoder.model.load_state_dict(initial_encoder)
    module = _new_module(cfg, encoder, texts, final_dm)
    final = FinalWeights(root / "refit", stop_after=epochs_chosen)
    _fit(cfg, kind, module, final_dm, [final, *(callbacks or [])], root / "refit", selection_epochs,
         fast_dev_run, progress_bar, validate=False)
    if final.weights_path.is_file():
        load_trainable_state(module, final.weights_path)
    timings.update(refit_features=t_feat2 - t_fit, refit=time.perf_counter() - t_feat2)
    peaks.mark("refit")
    return module, final_dm


def _final_second_stage(model: Recommender, fitted_ranker: Ranker, ranker_info: dict, dm: RecDataModule,
                        final_dm: RecDataModule, catalog: pd.DataFrame, lag, seed: int) -> tuple[CollabModel, Ranker]:
    """The served second stage: collaborative counts and text head refit on the whole window (the final
    encoder's vectors), as the towers are; with a refit, the fusion model too on the whole window's rows
    (same rounds per row, same blend). Without one, the statistics head on the train part's rows + the
    validation rows."""
    vecs = model.text_vectors(dm.items.texts).numpy()
    if final_dm is dm:
        rows = pd.concat([dm.train_events, dm.val_events], ignore_index=True)
        wide = np.concatenate([dm.train_wide, dm.tensors["val"]["wide"].numpy()])
    else:
        rows, wide = final_dm.train_events, final_dm.train_wide
    collab = CollabModel.fit(rows, _text_lookup(dm.items, vecs), final_dm.prior, wide)
    if final_dm is not dm:
        x, y = fusion_rows(final_dm.train_events, final_dm.tensors["train"], final_dm.events, catalog,
                           final_dm.items, vecs, final_dm.prior, lag)
        if len(y) >= MIN_ROWS and len(np.unique(y)) == 2:
            pick = [FUSION_COLUMNS.index(c) for c in fitted_ranker.columns]
            fitted_ranker = fitted_ranker.refit(x[:, pick], y, seed=seed)
            ranker_info["refit_rows"] = len(y)
    return collab, fitted_ranker


def _engine_kwargs(engine) -> dict:
    """``RecDataModule`` keywords that route the window's features through ``engine`` (none for the
    embedded pandas engine: the default path stays exactly as it was)."""
    return {} if type(engine) is PandasEngine else {"features": engine.point_in_time_features}


def _train(settings, events: pd.DataFrame, catalog: pd.DataFrame, engine, *, fast_dev_run, max_epochs,
           progress_bar, run_dir, callbacks, refit_full, ranker) -> TrainedModel:
    cfg = settings.training
    kind, _ = parse_mode(cfg.mode)
    refit = bool(settings.retrain.refit_full if refit_full is None else refit_full)
    ranker = cfg.ranker if ranker is None else ranker
    ranker = None if ranker == "none" else ranker
    lag = settings.feature_lag
    _quiet_lightning()
    t0 = time.perf_counter()
    peaks = PhasePeaks()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = RecDataModule(events, catalog, cfg.history_len, cfg.val_fraction, cfg.batch_size, cfg.seed, lag=lag,
                       **_engine_kwargs(engine))
    dm.setup("fit")
    t_feat = time.perf_counter()
    peaks.mark("features")

    encoder_path = Path(cfg.encoder_path) if cfg.encoder_path else default_encoder_path()
    encoder = TextEncoder(encoder_path, cfg.max_text_tokens)
    encode = None if type(engine) is PandasEngine else (lambda t, bs: engine.encode_texts(encoder, t, bs))
    texts = TextSource(encoder, cfg.mode, dm.items.texts, dm.query_texts, encode=encode)
    # fine-tuning changes the encoder in place: keep its starting weights for the refit
    initial_encoder = ({k: v.detach().clone() for k, v in encoder.model.state_dict().items()}
                       if refit and texts.trains_encoder else None)
    t_enc = time.perf_counter()
    peaks.mark("encode")

    module = _new_module(cfg, encoder, texts, dm)
    selection_epochs = max_epochs or cfg.max_epochs
    timings: dict[str, float] = {}
    final_dm = dm
    cold_order = "model"
    with tempfile.TemporaryDirectory(prefix="recloop-train-") as tmp:
        root = Path(run_dir) if run_dir else Path(tmp)
        best = BestWeights(root / "best")
        _fit(cfg, kind, module, dm,
             [best, EarlyStopping(monitor="val_auc", mode="max", patience=cfg.patience), *(callbacks or [])],
             root / "selection", selection_epochs, fast_dev_run, progress_bar)
        history = json.loads(best.history_path.read_text()) if best.history_path.is_file() else best.history
        epochs_chosen, best_auc = _chosen_epochs(history)
        t_fit = time.perf_counter()
        peaks.mark("fit")
        timings.update(features=t_feat - t0, encode=t_enc - t_feat, fit=t_fit - t_enc)
        fitted_ranker, ranker_info = None, None
        if ranker and dm.n_val >= MIN_ROWS and dm.val_events["label"].nunique() == 2 and not fast_dev_run:
            if best.weights_path.is_file():  # the selection towers at their best epoch
                load_trainable_state(module, best.weights_path)
            vecs = texts.item_vecs.cpu().numpy() if kind == "frozen" else encoder.encode(dm.items.texts).numpy()
            fitted_ranker, ranker_info = fit_ranker(module, dm, catalog, vecs, ranker, cfg.seed, lag,
                                                    cfg.fusion_columns, cfg.blend_towers)
            t_rank = time.perf_counter()
            timings["ranker"] = t_rank - t_fit
            peaks.mark("ranker")
            if fitted_ranker is not None:
                cold_order, cold_info = _choose_cold_order(settings, module, encoder, encoder_path, texts, kind, dm,
                                                           catalog, vecs, fitted_ranker, ranker_info, history,
                                                           best_auc, epochs_chosen, lag)
                ranker_info["cold_start"] = cold_info
                timings["cold_start_order"] = time.perf_counter() - t_rank
                t_rank = time.perf_counter()
            t_fit = t_rank
        if refit:
            module = None  # the selection run's module is not used again (the refit builds its own)
            module, final_dm = _refit(cfg, kind, events, catalog, engine, dm, encoder, texts, initial_encoder,
                                      epochs_chosen, selection_epochs, root, callbacks, fast_dev_run,
                                      progress_bar, timings, peaks, t_fit)
        elif best.weights_path.is_file():
            load_trainable_state(module, best.weights_path)

    module = module.cpu()
    net = module.net.cpu().eval()
    encoder.model.cpu().eval()
    config = _config(cfg, encoder, encoder_path, dm, final_dm, history, best_auc, epochs_chosen, refit, lag,
                     ranker_info, cold_order)
    model = Recommender(net, encoder, config)
    if kind == "frozen":  # reuse the vectors computed for training: no second encoding pass
        model.remember_texts(dm.items.texts, texts.item_vecs.cpu().numpy())
        if dm.query_texts:
            model.remember_texts(dm.query_texts, texts.query_vecs.cpu().numpy())
    if fitted_ranker is not None:
        t_c = time.perf_counter()
        model.collab, model.ranker = _final_second_stage(model, fitted_ranker, ranker_info, dm, final_dm, catalog,
                                                         lag, cfg.seed)
        timings["collab_refit"] = time.perf_counter() - t_c
        peaks.mark("collab_refit")
    return TrainedModel(model=model, history=history, seconds=time.perf_counter() - t0, n_train=final_dm.n_train,
                        n_val=dm.n_val, best_val_auc=best_auc, train_start=dm.window_start,
                        train_end=dm.window_end, timings=timings, peak_mib=peaks.mib, epochs_chosen=epochs_chosen, refit_full=refit,
                        feature_lag=lag, ranker=ranker_info)
