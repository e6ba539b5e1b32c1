"""Shared test helpers."""
import os
import pathlib

import pytest


def require_shared_data(relpath: str) -> pathlib.Path:
    """The shared data file `relpath`: skip with the reason when it is absent, but fail instead when
    QUANTFARM_REQUIRE_SHARED_DATA=1 (CI sets it, so missing data cannot silently skip real-data tests)."""
    from calibration import shared_file  # lazy: a broken calibration package must not break collection
    from service.errors import CalibrationError

    try:
        path = shared_file(relpath)
        why = f"shared data file {relpath} not found (set QUANTFARM_DATA to the shared data folder)"
    except CalibrationError as e:
        path, why = None, str(e)
    if path is None:
        if os.environ.get("QUANTFARM_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"{why}; QUANTFARM_REQUIRE_SHARED_DATA=1 requires it")
        pytest.skip(why)
    return path


@pytest.fixture(autouse=True, scope="session")
def _private_home(tmp_path_factory):
    """Commands run by tests (and their subprocesses) keep their baseline cache and tokens in a temporary
    QUANTFARM_HOME, never in the user's ~/.quantfarm."""
    if "QUANTFARM_HOME" not in os.environ:
        os.environ["QUANTFARM_HOME"] = str(tmp_path_factory.mktemp("quantfarm-home"))
    yield
