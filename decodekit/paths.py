"""Where decodekit finds shared data and writes its own files.

From a source checkout the shared data folder is ``../shared/data`` beside the project and benchmark
results go to ``bench/results/``; an installed wheel has no checkout around it, so results go to
``./decodekit-results/`` in the working directory. ``$DECODEKIT_DATA`` and ``$DECODEKIT_RESULTS``
override both.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent if (PACKAGE.parent / "pyproject.toml").exists() else None


def data_dir() -> Path:
    """The shared data folder (Spec-Bench, GSM8K, JSONSchemaBench, ...)."""
    override = os.environ.get("DECODEKIT_DATA")
    if override:
        return Path(override).expanduser().resolve()
    return (CHECKOUT or Path.cwd()).parent / "shared" / "data"


def results_dir() -> Path:
    """Where benchmark results go."""
    override = os.environ.get("DECODEKIT_RESULTS")
    if override:
        return Path(override).expanduser().resolve()
    return CHECKOUT / "bench" / "results" if CHECKOUT is not None else Path.cwd() / "decodekit-results"
