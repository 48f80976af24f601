"""MkDocs hook: the figures the rendered sections link to (``benchmarks/results/**/*.png``, paths from the
repository root) are published at the same paths in the site, so the pages link them as rendered."""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add every PNG under benchmarks/results to the site, at its path from the repository root."""
    for png in sorted((ROOT / "benchmarks" / "results").rglob("*.png")):
        files.append(File(png.relative_to(ROOT).as_posix(), str(ROOT), config.site_dir, config.use_directory_urls))
    return files
