"""Shared by the benchmark scripts: replace one section of docs/benchmarks.md, keeping the others."""

from __future__ import annotations

from pathlib import Path


def write_section(path: str | Path, heading: str, text: str) -> None:
    """Put ``text`` (which starts with the ``## heading`` line) in place of the section of that heading."""
    path = Path(path)
    doc = path.read_text() if path.is_file() else "# Benchmarks\n\nFigures written by the scripts in `benchmarks/`.\n"
    start = doc.find(f"## {heading}")
    if start >= 0:
        end = doc.find("\n## ", start + 1)
        doc = doc[:start] + (doc[end + 1 :] if end >= 0 else "")
    path.write_text(doc.rstrip() + "\n\n" + text.rstrip() + "\n")
