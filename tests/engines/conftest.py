"""Fixtures for the engine builder tests."""
import pytest


@pytest.fixture(scope="session")
def tiny_folder(tiny_model, tmp_path_factory):
    """Engine folder of the tiny model at 64x64 with the CFG batch (the UNet batch varies: 1 or 2)."""
    from lcmrt.export.build import BuildRequest, build_engine_folder
    from lcmrt.export.lora import parse_lora_arg

    out = tmp_path_factory.mktemp("engines") / "tiny"
    build_engine_folder(BuildRequest(model=str(tiny_model["model"]), out=out,
                                     lcm_lora=parse_lora_arg(str(tiny_model["lcm_lora"]), role="lcm"),
                                     height=64, width=64, guidance_mode="cfg"))
    return out
