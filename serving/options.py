"""Serving knobs of the hardening pass: :func:`option` reads one from ``ServingSettings``
(``[recloop.serving]`` in ``recloop.toml``, ``RECLOOP_SERVING__*``), with its declared default for
settings objects built without it."""

from __future__ import annotations

from typing import Any

from recloop.settings import ServingSettings

NAMES = ("allowed_hosts", "max_header_bytes", "feedback_flush_seconds", "feedback_flush_events",
         "feedback_rate_per_client_per_minute", "feedback_rate_global_per_minute", "insecure")
# the defaults live once, in recloop.settings.ServingSettings (documented there)
DEFAULTS: dict[str, Any] = {n: ServingSettings.model_fields[n].default for n in NAMES}


def option(serving_settings, name: str) -> Any:
    """``serving_settings.<name>`` when declared (or set with ``model_copy(update=...)``), else the default."""
    if name not in DEFAULTS:
        raise KeyError(f"unknown serving option {name!r}")
    return getattr(serving_settings, name, DEFAULTS[name])
