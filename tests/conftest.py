"""Shared fixtures: small generated models, built once per test session."""
import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """{"model", "lcm_lora", "style_lora"} paths of the tiny random SD1.5 model, seed 0."""
    from lcmrt.export.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("random-model") / "tiny", size="tiny", seed=0)
