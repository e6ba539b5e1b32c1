"""Where a farm keeps its data: HOME (QUANTFARM_HOME, default ~/.quantfarm) holds the SQLite store,
tokens.json, artifacts/ and per-job resume state/."""
import os
from pathlib import Path


def default_home() -> Path:
    return Path(os.environ.get("QUANTFARM_HOME", "~/.quantfarm")).expanduser()


def default_db(home: Path) -> str:
    return os.environ.get("QUANTFARM_DB") or f"sqlite:///{home / 'quantfarm.db'}"
