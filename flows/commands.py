"""CLI commands of the flows room: demo, up, down, retrain, loop."""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.cli_common import JsonOpt, WorkspaceOpt, emit, settings_for, table, terminate_like_ctrl_c


def register(app: typer.Typer) -> None:
    app.command()(demo)
    app.command()(up)
    app.command()(down)
    app.command()(retrain)
    app.command()(loop)


def demo(workspace: Path = WorkspaceOpt,
         fresh: bool = typer.Option(True, help="Start from an empty workspace")):
    """Run the whole loop on the embedded default (synthetic data, SQLite MLflow, ephemeral Prefect)."""
    from flows.demo import run_loop_demo  # the full loop, driven through the Prefect deployments

    with terminate_like_ctrl_c():  # SIGTERM stops the demo's stack like Ctrl-C
        run_loop_demo(settings_for(workspace), fresh=fresh)


def up(workspace: Path = WorkspaceOpt,
       background: bool = typer.Option(False, "--background", help="Start and return; stop with `recloop down`"),
       mlflow: bool = typer.Option(True, help="Start the MLflow UI server"),
       serve: bool = typer.Option(True, help="Start the serving API"),
       services: bool = typer.Option(False, "--services",
                                     help="Also start PostgreSQL + S3 (SeaweedFS) under <workspace>/services and run "
                                          "Prefect, MLflow and recloop's state on them")):
    """Start Prefect server + deployments, MLflow server and the serving API on loopback.

    With --services: PostgreSQL and SeaweedFS S3 first (data in <workspace>/services, passwords generated once
    into secrets.json, mode 0600), Prefect and MLflow on PostgreSQL, MLflow artifacts in S3; prints the
    settings a worker needs (written in full to <workspace>/services/worker.env).
    In the foreground, Ctrl-C, SIGTERM (docker stop, systemd) and SIGHUP stop every service.
    """
    from flows.stack import Stack, run_foreground

    s = settings_for(workspace)
    try:
        stack = Stack(s, with_mlflow=mlflow, with_serving=serve, with_services=services)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc

    def started(st) -> None:
        table("recloop is up", ["service", "url"], [[k, v] for k, v in st.urls().items()])
        print(f"logs: {st.log_dir}")
        if st.backing is not None:
            env_file = st.backing.write_worker_env(with_mlflow=mlflow)
            print(f"worker settings (all of them, secrets included, in {env_file}; `set -a; . {env_file}`):")
            for key, value in st.backing.printable_env(with_mlflow=mlflow).items():
                print(f"  {key}={value}")

    if background:
        with terminate_like_ctrl_c():  # a signal while starting still stops what has started
            stack.start()
        started(stack)
        print("stop with: recloop down" + (f" -w {workspace}" if workspace else ""))
        return
    with terminate_like_ctrl_c():
        why = run_foreground(stack, on_started=lambda st: (started(st), print("Ctrl-C stops everything.")))
    if why == "a service exited":
        print("a service exited; the stack is stopped")


def down(workspace: Path = WorkspaceOpt):
    """Stop a stack started with `recloop up --background`."""
    from flows.stack import stop_background

    stopped = stop_background(settings_for(workspace))
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


def retrain(workspace: Path = WorkspaceOpt, reason: str = typer.Option("manual", help="Why (logged as lineage)"),
            as_json: bool = JsonOpt):
    """Run the retrain flow now (train, judge against the champion, promote or reject)."""
    from flows.retrain import retrain_flow

    s = settings_for(workspace)
    with terminate_like_ctrl_c():  # SIGTERM unwinds, so Prefect's temporary server is stopped at exit
        out = retrain_flow(reason=reason, workspace=str(s.root))
    emit(out, as_json, _render_retrain)


def loop(workspace: Path = WorkspaceOpt, as_json: bool = JsonOpt):
    """One turn by hand: ingest, monitor, retrain if drift."""
    from flows.loop import loop_flow

    s = settings_for(workspace)
    with terminate_like_ctrl_c():
        out = loop_flow(workspace=str(s.root))
    emit(out, as_json)


def _render_retrain(out: dict) -> None:
    rules = out.get("decision", {}).get("rules", [])
    table(f"version {out['version']}: {'promoted' if out['promoted'] else 'rejected'} (reason: {out['reason']})",
          ["rule", "candidate", "champion", "threshold", "verdict"],
          [[r.get("name"), _fmt(r.get("value")), _fmt(r.get("champion")), _fmt(r.get("threshold")),
            "pass" if r.get("passed") else "FAIL"] for r in rules])


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else v
