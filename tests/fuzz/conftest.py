"""Hypothesis profiles for the fuzz tests, and the folders they damage.

"ci" (the default) is bounded and reproducible: the whole directory runs in about a minute and a half on two
cores, and derandomize makes every run try the same examples. "release" tries thousands of examples per test
with fresh randomness (`HYPOTHESIS_PROFILE=release python -m pytest tests/fuzz`), and prints a blob that
replays a failure with `@reproduce_failure`. A test whose examples cost more than milliseconds (a
Pipeline.load, a CLI run) takes a share of the profile's `max_examples`. Nothing is stored in a `.hypothesis`
folder: a failure is replayed from its printed example.
"""
import os
import shutil

import pytest
from hypothesis import HealthCheck, settings

# Examples run against one copy of a folder made per test (function-scoped tmp_path), restored after each.
_SHARED_FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SHARED_FIXTURES, print_blob=False)
settings.register_profile("release", max_examples=5000, deadline=None, database=None,
                          suppress_health_check=_SHARED_FIXTURES, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def refit_copy(tiny_refit_engine, tmp_path):
    """A copy of tiny_refit_engine (adapters, refit map, refit-input graphs) to damage."""
    return shutil.copytree(tiny_refit_engine, tmp_path / "engine")


@pytest.fixture(params=["tiny_engine", "tiny_refit_engine"])
def engine_copy(request, tmp_path):
    """A copy of each shared tiny engine folder to damage."""
    return shutil.copytree(request.getfixturevalue(request.param), tmp_path / "engine")
