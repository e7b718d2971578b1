"""MkDocs hooks of the docs site.

``on_page_markdown``: links from a page to files of the repository outside ``docs/``. The room
pages and the README (the home page includes it) link to repository files so that they work on
the forge. On the site, ``benchmarks/RESULTS.md`` is the Benchmarks page (it includes that file),
and any other existing file outside ``docs/`` (a test, a script, the compose file) is shown as its
path in code. A link to a file that does not exist is left alone, so ``mkdocs build --strict``
still fails on it.

``on_page_content``: the docstrings' Sphinx roles (``:func:`name```) read as plain code in the API
reference.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")
ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj):(?=<code>)")
PAGES_FOR_FILES = {"benchmarks/RESULTS.md": "benchmarks.md"}  # repository file -> the page that includes it


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    here = Path(page.file.abs_src_path).resolve().parent

    def rewrite(m: re.Match) -> str:
        target = m.group("target")
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            return m.group(0)  # a URL or an absolute path: not ours
        path = (here / target).resolve()
        if path.is_relative_to(docs) or not path.is_relative_to(repo) or not path.exists():
            return m.group(0)
        rel = path.relative_to(repo).as_posix()
        if rel in PAGES_FOR_FILES:
            page_path = docs / PAGES_FOR_FILES[rel]
            return f"[{m.group('text')}]({os.path.relpath(page_path, here)}{m.group('anchor') or ''})"
        text = m.group("text").strip("*` ")
        return f"`{rel}`" if text == rel else f"{m.group('text')} (`{rel}`)"

    return LINK.sub(rewrite, markdown)


def on_page_content(html: str, page, config, files) -> str:
    return ROLE.sub("", html)
