"""The documentation site works offline: no diagram or script it needs comes from a CDN."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_mermaid_blocks() -> None:
    # mkdocs-material renders ```mermaid by loading mermaid.js from a CDN: offline, the
    # reader sees the diagram's source. Diagrams are text in plain code blocks instead.
    found = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").rglob("*.md"))
             if "```mermaid" in p.read_text()]
    assert found == []
    assert "mermaid" not in (ROOT / "mkdocs.yml").read_text().replace("No mermaid", "")


def test_no_remote_scripts() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    assert "extra_javascript" not in config or "http" not in config.split("extra_javascript")[1]
