"""The project's version, as installed (pyproject.toml's `version`; CHANGELOG.md says what each
one changed). The report, benchmark.json's machine facts and every MLflow run record it, so a
figure can be traced to the code that measured it (with `git_commit`, which they record too)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "oi-pipeline"


def project_version() -> str:
    """The installed distribution's version; 'not installed' when the code runs from a bare
    checkout (no `pip install -e .`), which `make install` never leaves."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "not installed"
