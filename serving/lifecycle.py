"""Which model answers: loading the champion, polling its alias, hot-swapping.

A request reads :attr:`ModelHolder.current` once and uses that :class:`Served` bundle
(model, version, item index) to the end, so a swap never mixes two models inside one
response. A swap builds everything first (load weights, encode the catalog) and then
replaces one reference: requests in flight finish on the old bundle, new ones get the
new bundle, none waits and none fails.

One background thread (:meth:`ModelHolder.start`) does all the maintenance in order:
refresh the cached store view, poll the model source every ``poll_seconds``, rebuild the
item index when the catalog changed. A single writer means no races between these.

A champion that fails to load never leaves the service without a model: with nothing served
yet (a start, or only broken versions so far) the holder walks the source's
``fallback_versions`` — for the registry the ``previous`` alias, then older promoted versions,
newest first — and serves the first that loads; with a model already served it keeps serving
it. Either way ``/health`` says ``degraded`` with the reason until the champion loads again
(retried every few polls), and every fallback and repair is logged.

Model sources (the loader is injectable):

* :class:`RegistryModelSource` — ``models:/<model_name>@champion`` in MLflow;
* :class:`LocalDirModelSource` — saved ``Recommender`` folders plus a ``CHAMPION`` pointer
  file (tests, benchmarks, a box without MLflow);
* :class:`InMemoryModelSource` — objects handed in directly (unit tests).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from serving.ann import AnnParams
from serving.index import ItemIndex
from serving.ivf import IvfParams
from serving.storeview import StoreView

log = logging.getLogger(__name__)


@runtime_checkable
class ModelSource(Protocol):
    def current_version(self) -> str | None:
        """The version that should be served now (``None``: nothing to serve yet)."""

    def load(self, version: str) -> tuple[Any, dict]:
        """Load ``version``: ``(Recommender, info)``; ``info`` feeds ``GET /model``."""

    # optional: ``fallback_versions(failed: str) -> list[str]``, the versions to serve instead of a
    # champion that does not load, best first (see ModelHolder.poll_once)


def _recommender_cls():
    from models.recommender import Recommender

    return Recommender


class LocalDirModelSource:
    """Model folders under ``root``; the file ``root/CHAMPION`` names the one to serve.

    If ``root`` is itself a saved model (has ``config.json``) and there is no ``CHAMPION``
    file, that model is served as version ``root.name``.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def current_version(self) -> str | None:
        pointer = self.root / "CHAMPION"
        if pointer.is_file():
            v = pointer.read_text(encoding="utf-8").strip()
            return v or None
        if (self.root / "config.json").is_file():
            return self.root.name
        return None

    def model_dir(self, version: str) -> Path:
        if (self.root / "CHAMPION").is_file() or not (self.root / "config.json").is_file():
            return self.root / version
        return self.root

    def load(self, version: str) -> tuple[Any, dict]:
        path = self.model_dir(version)
        model = _recommender_cls().load(path)
        info = {"source": f"local:{path}", **_model_info(model)}
        return model, info

    def index_dir(self, version: str) -> Path:
        """Where the version's ANN graph is saved: ``ann/`` inside its model folder."""
        return self.model_dir(version) / "ann"

    def set_champion(self, version: str) -> None:
        from recloop.store import atomic_write_bytes

        if not (self.root / version).is_dir():
            raise FileNotFoundError(f"no model folder {self.root / version}")
        current = self.current_version() if (self.root / "CHAMPION").is_file() else None
        if current and current != version:
            atomic_write_bytes(self.root / "PREVIOUS", current.encode())
        atomic_write_bytes(self.root / "CHAMPION", version.encode())

    def fallback_versions(self, failed: str) -> list[str]:
        """``PREVIOUS`` (the champion before, kept by :meth:`set_champion`), then the other model
        folders, newest name first (numeric names by number)."""
        if not (self.root / "CHAMPION").is_file():
            return []
        out = []
        pointer = self.root / "PREVIOUS"
        if pointer.is_file():
            out.append(pointer.read_text(encoding="utf-8").strip())
        folders = [p.name for p in self.root.iterdir() if p.is_dir() and (p / "config.json").is_file()]
        out += sorted(folders, key=lambda n: (n.isdigit(), int(n) if n.isdigit() else 0, n), reverse=True)
        return _dedup([v for v in out if v and v != failed])


class InMemoryModelSource:
    """Models handed in as objects; :meth:`set` changes the champion."""

    def __init__(self, model=None, version: str | None = None, info: dict | None = None):
        self._models: dict[str, tuple[Any, dict]] = {}
        self._current: str | None = None
        self.loads = 0
        if model is not None:
            self.set(version or "1", model, info)

    def set(self, version: str, model, info: dict | None = None) -> None:
        self._models.pop(version, None)
        self._models[version] = (model, dict(info or {}))
        self._current = version

    def fallback_versions(self, failed: str) -> list[str]:
        """The versions set before, the most recent first."""
        return [v for v in reversed(list(self._models)) if v != failed]

    def current_version(self) -> str | None:
        return self._current

    def load(self, version: str) -> tuple[Any, dict]:
        self.loads += 1
        model, info = self._models[version]
        return model, {"source": "memory", **_model_info(model), **info}


class RegistryModelSource:
    """``models:/<model_name>@champion`` in the workspace's MLflow registry (``models.registry``)."""

    alias = "champion"

    def __init__(self, settings):
        self.settings = settings

    def current_version(self) -> str | None:
        from models import registry

        return registry.champion_version(self.settings)  # None: no registry / model / alias yet

    def load(self, version: str) -> tuple[Any, dict]:
        from models import registry

        before = self._cache_stamp(version)
        model, vinfo = registry.load_version(self.settings, version)
        after = self._cache_stamp(version)
        if before is not None and after != before:  # load_version found the cache corrupt and re-fetched it
            log.warning("repaired: the local cache of version %s failed its checksum and was re-fetched from "
                        "the registry", version)
        info = {"source": f"models:/{self.settings.model_name}@{self.alias}", **_model_info(model)}
        info.update({k: v for k, v in vinfo.items() if k not in ("version",)})
        info["version"] = str(vinfo.get("version", version))
        run = self._run_info(vinfo.get("run_id"))
        if "trained_window" in run:
            info["trained_window"] = {**info.get("trained_window", {}), **run.pop("trained_window")}
        info.update(run)
        return model, info

    def index_dir(self, version: str) -> Path | None:
        """Where the version's ANN graph is saved: ``ann/`` next to the version's local cache (``model/``),
        outside the checksummed model files; a re-fetched cache drops it with the rest."""
        from models import registry

        cache_dir = getattr(registry, "_cache_dir", None)
        return None if cache_dir is None else cache_dir(self.settings, str(version)) / "ann"

    def _cache_stamp(self, version: str) -> tuple[int, int] | None:
        """When the version's local cache was completed (None: no complete cache)."""
        from models import registry

        cache_dir = getattr(registry, "_cache_dir", None)
        if cache_dir is None:
            return None
        try:
            st = (cache_dir(self.settings, str(version)) / "COMPLETE").stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def fallback_versions(self, failed: str) -> list[str]:
        """The ``previous`` alias, then older versions promoted once (tag ``gate_decision = promoted``),
        newest first; never a rolled-back, rejected or failed one."""
        from models import registry

        c = registry.client(self.settings)
        name = self.settings.model_name
        out = []
        try:
            out.append(str(c.get_model_version_by_alias(name, "previous").version))
        except Exception as exc:  # no such alias
            log.debug("no 'previous' alias on %s: %s", name, exc)
        try:
            versions = c.search_model_versions(f"name='{name}'")
        except Exception as exc:
            log.warning("listing versions of %s for a fallback failed: %s", name, exc)
            versions = []
        promoted = [mv for mv in versions if (mv.tags or {}).get("gate_decision") == "promoted"]
        out += [str(mv.version) for mv in sorted(promoted, key=lambda mv: int(mv.version), reverse=True)]
        return _dedup([v for v in out if v != str(failed)])

    def _run_info(self, run_id: str | None) -> dict:
        """Metrics and the training window logged with the version's run (best effort)."""
        if not run_id:
            return {}
        from models import registry

        try:
            run = registry.client(self.settings).get_run(run_id)
        except Exception as exc:  # info is best effort; serving does not depend on it
            return {"registry_error": f"{type(exc).__name__}: {exc}"}
        out: dict[str, Any] = {"metrics": dict(run.data.metrics)}
        tags = run.data.tags
        window = {k: tags[k] for k in ("train_start", "train_end", "window_start", "window_end") if k in tags}
        if window:
            out["trained_window"] = window
        return out


def _ivf_params(settings) -> IvfParams | None:
    """The inverted file's parameters when user retrieval goes through one (``serving.ann_user_index``)."""
    if getattr(settings.serving, "ann_user_index", "ivf") != "ivf":
        return None
    return IvfParams.from_settings(settings)


def _retrieval_info(index: ItemIndex) -> dict:
    """How the served index retrieves (``GET /model`` details)."""
    ann = index.ann
    search = None if not index.searchable else \
        {"kind": "exact" if index.text_ann is None else "ann", "dim": index.text_dim}
    if index.text_ann is not None:
        search.update(graph=index.text_ann.how, graph_seconds=round(index.text_ann.build_seconds, 3),
                      memory_bytes=int(getattr(index.text_ann.graph, "memory_usage", 0) or 0))
    if index.ivf is not None:
        ivf = index.ivf
        out = {"kind": "ivf", "items": len(index), "lists": ivf.n_lists, "probes": ivf.params.probes,
               "how": ivf.how, "build_seconds": round(ivf.build_seconds, 3), "memory_bytes": ivf.memory_bytes}
    elif ann is None:
        out = {"kind": "exact", "items": len(index)}
    else:
        out = {"kind": "ann", "library": "usearch", "items": len(index), "graph": ann.how,
               "graph_seconds": round(ann.build_seconds, 3), "ef_search": ann.params.ef_search,
               "connectivity": ann.params.connectivity, "dtype": ann.params.dtype,
               "memory_bytes": int(getattr(ann.graph, "memory_usage", 0) or 0)}
    if search is not None:
        out["search"] = search  # /search's retrieval over the item texts' encoder vectors
    return out


def _dedup(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _model_info(model) -> dict:
    info = getattr(model, "info", None)
    info = dict(info) if isinstance(info, dict) else {}
    out: dict[str, Any] = {"model_info": info}
    window = {k: info[k] for k in ("train_start", "train_end") if info.get(k) is not None}
    if "train_window" in info:
        window["train_window"] = info["train_window"]
    if window:
        out["trained_window"] = window
    if "metrics" in info:
        out["metrics"] = info["metrics"]
    return out


@dataclass(frozen=True)
class Served:
    """Everything one request needs, swapped as a unit."""

    model: Any
    version: str
    info: dict
    index: ItemIndex
    catalog_sig: Any
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    # Serialises the generic (pandas) model calls and index rebuilds per model, for models not
    # known to be thread-safe. The Recommender's fast path (user_context / score_items) takes no
    # lock: its caches are locked or read once, and its networks run under inference_mode.
    model_lock: Any = field(default_factory=threading.Lock, compare=False, repr=False)


class ModelHolder:
    def __init__(self, source: ModelSource, view: StoreView, settings):
        self.source = source
        self.view = view
        self.settings = settings
        self.current: Served | None = None
        self.swaps = 0
        self.last_error: str | None = None
        self.degraded: str | None = None  # why the champion is not what is served (None: it is)
        self.last_poll: float | None = None
        self._failed: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one maintenance step at a time (thread, admin reload, tests)

    # ---- maintenance ------------------------------------------------------------------------
    def poll_once(self) -> bool:
        """Serve the source's current version if it differs from the one served (True: swapped).

        A version that fails to load is retried after a few poll intervals; meanwhile the model
        served stays, or — with none served — the first loadable of ``source.fallback_versions``.
        """
        with self._lock:
            self.last_poll = time.time()
            try:
                version = self.source.current_version()
            except Exception as exc:
                self.last_error = f"polling the model source failed: {exc}"
                log.warning(self.last_error)
                return False
            cur = self.current
            if version is None or (cur is not None and version == cur.version):
                if cur is not None and version == cur.version and self.degraded:
                    log.warning("repaired: serving the champion, version %s, again", version)
                    self.degraded = None
                return False
            retry_at = self._failed.get(version)
            if retry_at is not None and time.time() < retry_at:
                return False
            error = self._try_swap(version)
            if error is None:
                if self.degraded:
                    log.warning("repaired: champion version %s loads again (%s)", version, self.degraded)
                self.degraded = None
                self.last_error = None
                return True
            self._failed[version] = time.time() + max(self.settings.serving.poll_seconds, 1.0) * 3
            self.last_error = f"loading version {version} failed: {error}"
            if cur is not None:
                self.degraded = (f"champion version {version} does not load ({error}); still serving "
                                 f"version {cur.version}")
                log.warning("degraded: %s", self.degraded)
                return False
            return self._fall_back(version, error)

    def _try_swap(self, version: str, fallback_for: str | None = None) -> str | None:
        """Load ``version`` and swap it in; returns the error text instead of raising."""
        try:
            model, info = self.source.load(version)
            version = str(info.get("version", version))
            data = self.view.data
            index = ItemIndex.build(model, data.catalog.reset_index())
            index = self._with_ann(index, model, version)
        except Exception as exc:
            log.exception("loading model version %s failed", version)
            return f"{type(exc).__name__}: {exc}"
        info = {**info, "version": version, "retrieval": _retrieval_info(index)}
        if fallback_for is not None:
            info["fallback_for"] = fallback_for
        self.current = Served(model=model, version=version, info=info, index=index, catalog_sig=data.catalog_sig)
        self.swaps += 1
        self._failed.pop(version, None)
        log.info("serving model version %s (%d items indexed in %.1fs, %d encoded)", version, len(index),
                 index.build_seconds, index.n_encoded)
        return None

    def _with_ann(self, index: ItemIndex, model, version: str) -> ItemIndex:
        """Attach the ANN graph (large catalogs): loaded from the source's ``index_dir`` when saved there
        for this model + catalog, else built (and saved there)."""
        params = AnnParams.from_settings(self.settings)
        if len(index) < params.min_items:
            return index
        directory = None
        index_dir = getattr(self.source, "index_dir", None)
        if index_dir is not None:
            try:
                directory = index_dir(version)
            except Exception as exc:  # no place to save: build in memory
                log.warning("no ANN index folder for version %s: %s", version, exc)
        config = getattr(model, "config", None)
        stamp = f"{version}@{config.get('saved_at')}" if isinstance(config, dict) else str(version)
        return index.with_ann(params, directory=directory, model_stamp=stamp, ivf=_ivf_params(self.settings))

    def _fall_back(self, failed: str, error: str) -> bool:
        """Nothing served and the champion broken: serve the newest fallback version that loads."""
        fallbacks = getattr(self.source, "fallback_versions", None)
        try:
            candidates = list(fallbacks(failed)) if fallbacks is not None else []
        except Exception as exc:
            log.warning("listing fallback versions failed: %s", exc)
            candidates = []
        tried = []
        for v in candidates:
            retry_at = self._failed.get(v)
            if retry_at is not None and time.time() < retry_at:
                continue
            problem = self._try_swap(v, fallback_for=failed)
            if problem is None:
                self.degraded = (f"champion version {failed} does not load ({error}); serving fallback version "
                                 f"{v}" + (f" (also broken: {', '.join(tried)})" if tried else ""))
                log.warning("degraded: %s", self.degraded)
                return True
            self._failed[v] = time.time() + max(self.settings.serving.poll_seconds, 1.0) * 3
            tried.append(v)
        self.degraded = (f"champion version {failed} does not load ({error}); no fallback version loads"
                         + (f" (tried {', '.join(tried)})" if tried else " (none known)"))
        log.error("no model to serve: %s", self.degraded)
        return False

    def refresh_data(self) -> bool:
        """Refresh the store view; rebuild the item index (incrementally) if the catalog changed."""
        with self._lock:
            changed = self.view.refresh()
            cur = self.current
            data = self.view.data
            if cur is None or data.catalog_sig == cur.catalog_sig:
                return changed
            try:
                with cur.model_lock:
                    index = ItemIndex.build(cur.model, data.catalog.reset_index(), previous=cur.index,
                                            defer_text_reads=True)  # with_ann reads what it needs
                index = index.with_ann(AnnParams.from_settings(self.settings), previous=cur.index,
                                       ivf=_ivf_params(self.settings))
            except Exception as exc:
                self.last_error = f"re-indexing the catalog failed: {type(exc).__name__}: {exc}"
                log.exception("re-indexing failed")
                return changed
            if self.current is cur:
                info = {**cur.info, "retrieval": _retrieval_info(index)}
                self.current = Served(model=cur.model, version=cur.version, info=info, index=index,
                                      catalog_sig=data.catalog_sig, loaded_at=cur.loaded_at,
                                      model_lock=cur.model_lock)
            log.info("item index refreshed: %d items (%d encoded)", len(index), index.n_encoded)
            return True

    def _loop(self) -> None:
        s = self.settings.serving
        next_poll = time.monotonic() + s.poll_seconds
        next_refresh = time.monotonic() + s.store_refresh_seconds
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_refresh:
                    self.refresh_data()
                    next_refresh = time.monotonic() + s.store_refresh_seconds
                if now >= next_poll:
                    self.poll_once()
                    next_poll = time.monotonic() + s.poll_seconds
            except Exception:  # the thread must survive anything
                log.exception("serving maintenance step failed")
            wait = max(0.01, min(next_poll, next_refresh) - time.monotonic())
            self._stop.wait(wait)

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="recloop-serving-maintenance", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
