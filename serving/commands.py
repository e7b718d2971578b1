"""``recloop serve``: the serving API under uvicorn."""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.cli_common import WorkspaceOpt, settings_for


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        workspace: Path = WorkspaceOpt,
        host: str = typer.Option(None, help="Bind address (default: settings.serving.host, 127.0.0.1)"),
        port: int = typer.Option(None, help="Port (default: settings.serving.port, 8000)"),
        model_dir: Path = typer.Option(None, "--model-dir",
                                       help="Serve saved model folder(s) from here instead of the MLflow "
                                            "champion (a model folder, or folders plus a CHAMPION file)"),
        log_level: str = typer.Option("info", help="uvicorn log level"),
    ):
        """Serve /recommend, /search and /feedback from the champion model (hot-swaps on promotion)."""
        import uvicorn

        from serving.app import create_app
        from serving.lifecycle import LocalDirModelSource

        s = settings_for(workspace)
        source = LocalDirModelSource(model_dir) if model_dir is not None else None
        app_ = create_app(s, model_source=source)
        uvicorn.run(app_, host=host or s.serving.host, port=port or s.serving.port, log_level=log_level,
                    access_log=False)
