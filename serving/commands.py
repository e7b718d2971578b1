"""``recloop serve``: the serving API under uvicorn.

Binding a non-loopback address without a token is refused unless ``--insecure`` is given
(then a warning is printed): without a token anyone who can reach the port can write feedback
and reload models. The server speaks HTTP/1.1 through h11 with the request head limited to
``max_header_bytes`` (uvicorn's default parser, httptools, has no such limit).
"""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.cli_common import WorkspaceOpt, fail, settings_for


def uvicorn_options(serving_settings, host: str, port: int, log_level: str = "info") -> dict:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` (header limit enforced on the wire)."""
    from serving.options import option

    return {"host": host, "port": port, "log_level": log_level, "access_log": False, "http": "h11",
            "h11_max_incomplete_event_size": int(option(serving_settings, "max_header_bytes")),
            "server_header": False}


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        workspace: Path = WorkspaceOpt,
        host: str = typer.Option(None, help="Bind address (default: settings.serving.host, 127.0.0.1). "
                                            "A non-loopback address needs a token, or --insecure"),
        port: int = typer.Option(None, help="Port (default: settings.serving.port, 8000)"),
        model_dir: Path = typer.Option(None, "--model-dir",
                                       help="Serve saved model folder(s) from here instead of the MLflow "
                                            "champion (a model folder, or folders plus a CHAMPION file)"),
        token: str = typer.Option(None, "--token", envvar="RECLOOP_SERVING__TOKEN", show_envvar=True,
                                  help="Bearer token for POST /feedback, /admin/* and /model's paths "
                                       "(prefer the environment variable: arguments show in `ps`)"),
        allowed_host: list[str] = typer.Option(None, "--allowed-host",
                                               help="Host header name clients use (repeatable; '*' = any). "
                                                    "Default: loopback names and the bind host"),
        insecure: bool = typer.Option(False, "--insecure",
                                      help="Allow a non-loopback bind address without a token"),
        log_level: str = typer.Option("info", help="uvicorn log level"),
    ):
        """Serve /recommend, /search and /feedback from the champion model (hot-swaps on promotion)."""
        import uvicorn

        from serving.app import create_app
        from serving.lifecycle import LocalDirModelSource
        from serving.options import option
        from serving.security import allowed_hosts, check_bind, is_loopback

        s = settings_for(workspace)
        bind = host or s.serving.host
        updates = {"host": bind}
        if token:
            updates["token"] = token
        if allowed_host:
            updates["allowed_hosts"] = list(allowed_host)
        s.serving = s.serving.model_copy(update=updates)
        insecure = insecure or bool(option(s.serving, "insecure"))
        refused = check_bind(bind, s.serving.token, insecure)
        if refused:
            fail(refused)
        if not is_loopback(bind):
            if not s.serving.token:
                typer.secho(f"WARNING: serving on {bind} WITHOUT a token (--insecure): anyone who can reach this "
                            "port can write feedback and reload models.", fg="red", err=True)
            hosts = allowed_hosts(s.serving)
            typer.secho(f"Host headers accepted: {', '.join(hosts) if hosts else 'any'} "
                        "(--allowed-host / serving.allowed_hosts)", err=True)
        source = LocalDirModelSource(model_dir) if model_dir is not None else None
        app_ = create_app(s, model_source=source)
        uvicorn.run(app_, **uvicorn_options(s.serving, bind, port or s.serving.port, log_level))
