"""Paths that come from outside (CLI arguments, flow parameters, event payloads) stay in their folder.

``confine(path, root)`` is the one check: the path, after ``~``, ``..`` and every symlink
are resolved, must lie inside ``root`` (itself resolved). A relative path is taken
relative to ``root``, never to the current directory (a deployment parameter or an
event payload has no meaningful working directory).
"""

from __future__ import annotations

import os
from pathlib import Path


class PathOutsideRoot(ValueError):
    """A path that resolves outside the folder it must stay in."""


def confine(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """The resolved ``path`` if it lies inside ``root``; raise :class:`PathOutsideRoot` (a ``ValueError``) if not.

    The path need not exist (a file already moved on is still a well-formed request).
    """
    if path is None or not str(path).strip():
        raise PathOutsideRoot(f"an empty path is not a file under {root}")
    if "\x00" in str(path):
        raise PathOutsideRoot(f"path {str(path)!r} contains a NUL byte")
    base = Path(root).expanduser().resolve()
    p = Path(path).expanduser()
    resolved = (p if p.is_absolute() else base / p).resolve()
    if base not in resolved.parents:
        raise PathOutsideRoot(f"{path} resolves to {resolved}, outside {base}; only files under {base} "
                              "are accepted here")
    return resolved
