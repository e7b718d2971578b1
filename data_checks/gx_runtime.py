"""One Great Expectations context per process (and per Data Docs folder).

Building a context, data source, suite, validation definition and checkpoint
costs a few hundred milliseconds; validating a batch must not pay it every time,
so the objects are built once and cached. GX objects are not thread-safe: callers
hold :data:`GX_LOCK` while running a checkpoint.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

GX_LOCK = threading.RLock()
DOCS_SITE = "recloop_data_docs"


@dataclass
class GXRuntime:
    context: object
    checkpoints: dict  # suite name -> gx.Checkpoint
    docs_dir: Path | None


_CACHE: dict[str, GXRuntime] = {}


def get_runtime(docs_dir: Path | None) -> GXRuntime:
    """The cached runtime for ``docs_dir`` (None: no Data Docs rendering)."""
    key = str(docs_dir) if docs_dir else ""
    with GX_LOCK:
        rt = _CACHE.get(key)
        if rt is None:
            rt = _CACHE[key] = _build(docs_dir)
        return rt


def _build(docs_dir: Path | None) -> GXRuntime:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import great_expectations as gx
        from great_expectations.checkpoint import UpdateDataDocsAction
        from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX fingerprints every in-memory batch with an md5 of the whole frame (~3 s per 1M rows). A batch is
    # already identified by the sha256 of its file (the batch_id), so skip it: frames above this size
    # are not fingerprinted.
    import great_expectations.execution_engine.pandas_execution_engine as pandas_engine

    from data_checks.suites import CATALOG_SUITE, FEEDBACK_SUITE, catalog_expectations, feedback_expectations

    pandas_engine.HASH_THRESHOLD = 0
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    actions = []
    if docs_dir is not None:
        docs_dir.mkdir(parents=True, exist_ok=True)
        ctx.add_data_docs_site(DOCS_SITE, {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        actions.append(UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE]))
    source = ctx.data_sources.add_pandas("recloop")
    checkpoints = {}
    for suite_name, exps in ((FEEDBACK_SUITE, feedback_expectations()), (CATALOG_SUITE, catalog_expectations())):
        asset = source.add_dataframe_asset(suite_name.replace("recloop_", ""))
        batch_def = asset.add_batch_definition_whole_dataframe("whole_batch")
        suite = ctx.suites.add(gx.ExpectationSuite(name=suite_name))
        for e in exps:
            suite.add_expectation(e)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{suite_name}_validation",
                                                                     data=batch_def, suite=suite))
        checkpoints[suite_name] = ctx.checkpoints.add(gx.Checkpoint(
            name=f"{suite_name}_checkpoint", validation_definitions=[vd], actions=list(actions),
            # COMPLETE: every failing row index comes back, so per-row reasons are GX's own verdict
            result_format={"result_format": "COMPLETE", "return_unexpected_index_query": False,
                           "partial_unexpected_count": 20},
        ))
    if docs_dir is not None:
        ctx.build_data_docs(site_names=[DOCS_SITE])  # the suite pages, once per process
    return GXRuntime(ctx, checkpoints, docs_dir)


def run_checkpoint(suite_name: str, df, params: dict, docs_dir: Path | None, run_name: str | None = None):
    """Run one suite on ``df``; returns (ExpectationSuiteValidationResult, data docs page or None)."""
    from great_expectations.core.run_identifier import RunIdentifier

    rt = get_runtime(docs_dir)
    with GX_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = rt.checkpoints[suite_name].run(batch_parameters={"dataframe": df}, expectation_parameters=params,
                                                run_id=RunIdentifier(run_name=run_name))
        (identifier, vr), = result.run_results.items()
        page = None
        if docs_dir is not None:
            try:
                urls = rt.context.get_docs_sites_urls(resource_identifier=identifier, site_names=[DOCS_SITE])
                page = urls[0]["site_url"].removeprefix("file://") if urls else None
            except Exception:
                page = None
    return vr, page
