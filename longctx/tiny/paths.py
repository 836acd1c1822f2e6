"""Where the tiny models' files live: the ``longctx`` package, its shipped models and the essay haystack."""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
MODELS_DIR = PACKAGE_DIR / "models_data"
ESSAY_PATH = PACKAGE_DIR.parent / "eval" / "data" / "synthetic_essays.json"
