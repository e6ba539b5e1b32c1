"""quantfarm's version, from the installed package's metadata (recorded in artifacts and baselines)."""
from importlib.metadata import PackageNotFoundError, version


def quantfarm_version() -> str:
    try:
        return version("quantfarm")
    except PackageNotFoundError:
        return "0+unknown"
