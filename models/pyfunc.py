"""The recommender as a custom ``mlflow.pyfunc`` model (no pickled torch modules).

What MLflow stores for a version (see :func:`models.registry.log_and_register`):

* ``artifacts/model/`` — the saved :class:`models.recommender.Recommender` folder:
  ``weights.safetensors``, ``config.json``, ``encoder/`` (safetensors + tokenizer),
  the item text-vector index (``text_vectors.safetensors`` + ``text_index.json``);
* ``artifacts/catalog/catalog.parquet`` — the catalog as of training time, so the model
  can score without a workspace;
* the model code itself is logged *as code* (MLflow "models from code"): loading runs
  ``mlflow.models.set_model(RecommenderPyfunc())`` instead of unpickling anything.

``predict`` takes a DataFrame of ``user_id``, ``item_id`` and optional ``query`` /
``timestamp`` and returns a DataFrame with one ``score`` (like-probability) per row.
User history and the freshest catalog come from a recloop workspace named by
``model_config={"workspace": ...}`` at ``load_model`` time or by ``$RECLOOP_WORKSPACE``;
without one, users are cold and items are read from the packaged catalog (text-only).
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pandas as pd

INPUT_COLUMNS = ("user_id", "item_id")
OPTIONAL_COLUMNS = ("query", "timestamp")

# The file MLflow runs to build the model at load time ("models from code").
MODEL_CODE = '''"""Built by recloop's registry: the recommender pyfunc, defined by code (nothing is unpickled)."""
import mlflow

from models.pyfunc import RecommenderPyfunc

mlflow.models.set_model(RecommenderPyfunc())
'''


class RecommenderPyfunc(mlflow.pyfunc.PythonModel):
    """Scores (user_id, item_id[, query]) pairs with a saved :class:`Recommender`."""

    def load_context(self, context) -> None:
        from models.recommender import Recommender

        model_dir = context.artifacts.get("model") if context.artifacts else None
        if not model_dir:
            raise ValueError("the pyfunc model has no 'model' artifact (the saved Recommender folder)")
        self.model = Recommender.load(model_dir)
        config = dict(context.model_config or {})
        self.workspace = config.get("workspace") or os.environ.get("RECLOOP_WORKSPACE") or None
        catalog_path = (context.artifacts or {}).get("catalog")
        self.packaged_catalog = None
        if catalog_path:
            p = Path(catalog_path)
            p = p / "catalog.parquet" if p.is_dir() else p
            self.packaged_catalog = pd.read_parquet(p)

    # the store is read on every call: scores use the freshest feedback (history) and catalog
    def _history_and_catalog(self) -> tuple[pd.DataFrame | None, pd.DataFrame]:
        if self.workspace:
            from recloop.settings import load_settings
            from recloop.store import FeedbackStore

            store = FeedbackStore.from_settings(load_settings(self.workspace))
            catalog = store.catalog()
            if self.packaged_catalog is not None and len(catalog) == 0:
                catalog = self.packaged_catalog
            return store.read(), catalog
        if self.packaged_catalog is None:
            raise ValueError("no workspace given (model_config={'workspace': ...} or $RECLOOP_WORKSPACE) and no "
                             "packaged catalog: cannot read item text")
        return None, self.packaged_catalog

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        missing = [c for c in INPUT_COLUMNS if c not in model_input.columns]
        if missing:
            raise ValueError(f"input lacks column(s) {missing}; expected user_id, item_id[, query, timestamp]")
        pairs = model_input[[c for c in (*INPUT_COLUMNS, *OPTIONAL_COLUMNS) if c in model_input.columns]].copy()
        pairs["user_id"] = pairs["user_id"].astype("string")
        pairs["item_id"] = pairs["item_id"].astype("string")
        if "query" in pairs.columns:
            pairs["query"] = pairs["query"].astype("string")
        if "timestamp" in pairs.columns:
            pairs["timestamp"] = pd.to_datetime(pairs["timestamp"], utc=True)
        history, catalog = self._history_and_catalog()
        scores = self.model.score(pairs, history, catalog)
        return pd.DataFrame({"score": scores}, index=model_input.index)


def signature():
    """Input: user_id, item_id (required), query, timestamp (optional). Output: score."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([ColSpec("string", "user_id"), ColSpec("string", "item_id"),
                     ColSpec("string", "query", required=False), ColSpec("datetime", "timestamp", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double", "score")]))
