"""The docs' build tools are named in one file, docs/requirements.txt: the nox docs
session installs it and docs/development.md shows the command (they were named only
in noxfile.py)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_docs_build_tools_are_one_file_that_nox_and_the_development_page_use():
    wanted = [line.strip() for line in (ROOT / "docs" / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert {"mkdocs-material", "mkdocstrings[python]"} <= set(wanted)
    nox = (ROOT / "noxfile.py").read_text()
    session = nox[nox.index("def docs("):nox.index("@nox.session", nox.index("def docs("))]
    assert 'ROOT / "docs" / "requirements.txt"' in session and 'install("mkdocs' not in session
    page = (ROOT / "docs" / "development.md").read_text()
    assert "pip install -r requirements-dev.txt -r docs/requirements.txt" in page
    assert "mkdocs build --strict" in page
    assert "requirements.txt" in (ROOT / "mkdocs.yml").read_text().split("exclude_docs:", 1)[1].split("\n\n")[0]
