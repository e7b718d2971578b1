"""Writing feedback as batch files into ``landing/`` (the way upstream systems deliver it)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from recloop.store import atomic_write_bytes, atomic_write_parquet

FORMATS = ("parquet", "csv", "jsonl")


def batch_file_name(prefix: str, start: pd.Timestamp, fmt: str) -> str:
    return f"{prefix}-{start.strftime('%Y%m%d')}.{fmt}"


def write_batch(df: pd.DataFrame, path: Path) -> Path:
    """Write one batch atomically; the format follows the file's suffix."""
    fmt = path.suffix.lstrip(".")
    if fmt == "parquet":
        atomic_write_parquet(df, path)
    elif fmt == "csv":
        atomic_write_bytes(path, df.to_csv(index=False).encode("utf-8"))
    elif fmt == "jsonl":
        atomic_write_bytes(path, df.to_json(orient="records", lines=True, date_format="iso").encode("utf-8"))
    else:
        raise ValueError(f"unknown batch format {fmt!r}; use one of {FORMATS}")
    return path


def split_by_period(events: pd.DataFrame, period_days: int, origin=None) -> dict[pd.Timestamp, pd.DataFrame]:
    """Group time-ordered events into consecutive periods of ``period_days`` (UTC), empty ones skipped."""
    if events.empty:
        return {}
    ts = pd.to_datetime(events["timestamp"], utc=True)
    origin = pd.Timestamp(origin, tz="UTC") if origin is not None else ts.min().normalize()
    k = ((ts - origin) // pd.Timedelta(days=period_days)).astype(int)
    return {
        origin + pd.Timedelta(days=int(i) * period_days): chunk.reset_index(drop=True)
        for i, chunk in events.groupby(k.to_numpy(), sort=True)
    }


def write_batches(batches: dict[pd.Timestamp, pd.DataFrame], landing_dir: Path, prefix: str,
                  fmt: str = "parquet") -> list[Path]:
    landing_dir.mkdir(parents=True, exist_ok=True)
    return [write_batch(df, landing_dir / batch_file_name(prefix, start, fmt)) for start, df in batches.items()]
