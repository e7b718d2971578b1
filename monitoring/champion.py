"""The registered champion as monitoring takes it: its reference window (``ChampionInfo``) and a scorer."""

from __future__ import annotations

from monitoring.windows import champion_from_lineage


def load_champion_for_monitoring(settings, store):
    """(ChampionInfo, scorer) of the registered champion, or (None, None) if there is none.

    The window and offline AUC come from the champion version's lineage tags and its run's
    metrics; the scorer is the model's point-in-time ``score`` with the store as history.
    """
    from models.champion import lineage  # MLflow: imported when a check runs, not with the module
    from models.registry import load_champion

    loaded = load_champion(settings)
    if loaded is None:
        return None, None
    model, meta = loaded
    version = meta.get("version") if isinstance(meta, dict) else getattr(meta, "version", None)
    tags, metrics = lineage(settings, version, meta)
    info = champion_from_lineage(version, tags, metrics)
    if info is None:
        raise RuntimeError(f"champion v{version} has no training window in its lineage tags "
                           "(window_start / eval_end): cannot pick a reference window")
    history, catalog = {}, {}

    def scorer(rows):
        if "events" not in history:  # read once, on first use
            history["events"] = store.read()
            catalog["items"] = store.catalog()
        return model.score(rows, history["events"], catalog["items"], lag=settings.feature_lag)

    return info, scorer
