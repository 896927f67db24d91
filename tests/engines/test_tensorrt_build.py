"""lcmrt.engines.tensorrt: the version-dependent build decisions, checked without TensorRT."""
import subprocess
import sys

import pytest

from lcmrt.engines.tensorrt import (build_options, check_refit_targets, optimization_profiles, parse_size,
                                    parse_trt_version, refit_targets)
from lcmrt.errors import BackendError, EngineFolderError, InputError
from lcmrt.manifest import Manifest


def test_versions():
    assert parse_trt_version("10.3.0") == (10, 3, 0)
    assert parse_trt_version("11.4.0.106") == (11, 4, 0)
    assert parse_trt_version("10.1") == (10, 1, 0)
    with pytest.raises(BackendError):
        parse_trt_version("dev")


@pytest.mark.parametrize("version, graph, refit, typed, flags, precision", [
    ("10.3.0", "fp16", True, True, ("REFIT_INDIVIDUAL",), "fp16"),   # strongly typed: no precision flags
    ("10.3.0", "fp32", True, False, ("FP16", "REFIT_INDIVIDUAL"), "fp16"),
    ("10.1.0", "fp32", True, False, ("FP16", "REFIT"), "fp16"),      # before REFIT_INDIVIDUAL
    ("10.16.1", "fp16", False, True, (), "fp16"),
    ("11.4.0.106", "fp16", True, False, ("REFIT_INDIVIDUAL",), "fp16"),  # 11: always strongly typed, no FP16 flag
    ("11.1.0", "fp32", False, False, (), "fp32"),
])
def test_build_options(version, graph, refit, typed, flags, precision):
    options = build_options(version, graph, refit)
    assert options.strongly_typed_flag is typed
    assert options.builder_flags == flags
    assert options.precision == precision
    assert options.mark_individual is ("REFIT_INDIVIDUAL" in flags)
    assert "FP16" not in flags or not typed  # TensorRT rejects precision flags on strongly typed networks
    assert not ("REFIT" in flags and "REFIT_INDIVIDUAL" in flags)


def test_fp32_engine_on_trt10():
    options = build_options("10.3.0", "fp32", False, fp16_flag=False)
    assert options.builder_flags == () and options.precision == "fp32"


def test_build_options_notes_and_errors():
    assert any("no FP16 flag" in n for n in build_options("11.0.0", "fp32", False).notes)
    assert any("REFIT_INDIVIDUAL" in n for n in build_options("10.0.1", "fp16", True).notes)
    with pytest.raises(BackendError, match="too old"):
        build_options("8.6.1", "fp16", False)
    with pytest.raises(InputError):
        build_options("10.3.0", "int8", False)


def test_parse_size():
    assert parse_size("2G") == 2 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5GiB") == int(1.5 * (1 << 30))
    assert parse_size(1024) == 1024
    assert parse_size(None, default=7) == 7
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(InputError):
            parse_size(bad)


def test_refit_targets_and_naming():
    refit_map = {
        "unet.down_blocks.0.attentions.0.proj_in": {"component": "unet", "weight": "onnx::MatMul_901",
                                                    "transpose": True},
        "unet.mid_block.resnets.0.conv1": {"component": "unet", "weight": "unet.mid_block.resnets.0.conv1.weight",
                                           "transpose": False},
        "unet.up_blocks.1.attentions.0.to_q": {"component": "unet", "weight": "unet.x.to_q.base_layer.weight",
                                               "transpose": False},
        "unet.up_blocks.1.attentions.0.to_k": {"component": "unet", "weight": "onnx::MatMul_950", "transpose": True},
        "text_encoder.encoder.layers.0.self_attn.q_proj": {"component": "text_encoder", "weight": "onnx::MatMul_7",
                                                           "transpose": True},
    }
    targets = ["unet.down_blocks.0.attentions.0.proj_in", "unet.mid_block.resnets.0.conv1",
               "unet.up_blocks.1.attentions.0.to_q", "text_encoder.encoder.layers.0.self_attn.q_proj"]
    components = {c: {"file": f"{c}.onnx", "sha256": {f"{c}.onnx": "0" * 64}}
                  for c in ("text_encoder", "unet", "vae_decoder")}
    manifest = {"components": components, "refit_map": refit_map, "adapters": [
        {"name": "lcm", "weight": 1.0, "fused": True, "targets": ["unet.up_blocks.1.attentions.0.to_k"]},
        {"name": "style", "weight": 0.8, "fused": False, "targets": targets}]}
    names = refit_targets(manifest, "unet")
    # only weights a swappable adapter targets: to_k is in the map but only the fused LCM-LoRA touches it
    assert names == sorted(["onnx::MatMul_901", "unet.mid_block.resnets.0.conv1.weight",
                            "unet.x.to_q.base_layer.weight"])
    assert refit_targets(manifest, "text_encoder") == ["onnx::MatMul_7"]
    assert refit_targets(manifest, "vae_decoder") == [] and refit_targets({}, "unet") == []
    graph = {"onnx::MatMul_901": 0, "unet.mid_block.resnets.0.conv1.weight": 0}
    report = check_refit_targets(names + ["unet.gone.weight"], graph)
    assert report == {"found": ["onnx::MatMul_901", "unet.mid_block.resnets.0.conv1.weight"],
                      "peft_names": ["unet.x.to_q.base_layer.weight"], "missing": ["unet.gone.weight"]}
    with pytest.raises(EngineFolderError, match=r"refit_map\.unet\.m has no 'weight'.*lcmrt adapter add"):
        refit_targets({"components": components, "refit_map": {"unet.m": {"component": "unet", "transpose": False}},
                       "adapters": [{"name": "style", "weight": 0.8, "fused": False, "targets": ["unet.m"]}]}, "unet")


def _manifest(inputs, dim_values, sizes=((64, 64),), unet_batches=(1, 2)) -> Manifest:
    entry = {"file": "unet.onnx", "sha256": {"unet.onnx": "0" * 64}, "dim_values": dim_values,
             "inputs": [{"name": n, "shape": shape, "dtype": "float32"} for n, shape in inputs]}
    h, w = sizes[0]
    shapes = {"batch": 1, "height": h, "width": w, "latent_channels": 4, "latent_height": h // 8,
              "latent_width": w // 8, "text_length": 77, "unet_batch_sizes": list(unet_batches),
              "sizes": [list(size) for size in sizes]}
    return Manifest({"shapes": shapes, "components": {"unet": entry}})


def test_optimization_profiles():
    unet = _manifest([("sample", ["unet_batch", 4, 8, 8]), ("timestep", [1]),
                      ("encoder_hidden_states", ["unet_batch", 77, 32])], {"unet_batch": [1, 2]})
    assert optimization_profiles(unet, "unet") == [{"sample": ((1, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8)),
                                                    "encoder_hidden_states": ((1, 77, 32), (2, 77, 32), (2, 77, 32))}]
    assert optimization_profiles(_manifest([("sample", [1, 4, 8, 8])], {}), "unet") == []
    # several sizes: one profile per size, the size fixed in each, the batch ranging
    sizes = _manifest([("sample", ["unet_batch", 4, "latent_height", "latent_width"]),
                       ("encoder_hidden_states", ["unet_batch", 77, 32])],
                      {"unet_batch": [1, 2], "latent_height": [8, 6], "latent_width": [8, 10]},
                      sizes=((64, 64), (48, 80)))
    assert optimization_profiles(sizes, "unet") == [
        {"sample": ((1, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8)),
         "encoder_hidden_states": ((1, 77, 32), (2, 77, 32), (2, 77, 32))},
        {"sample": ((1, 4, 6, 10), (2, 4, 6, 10), (2, 4, 6, 10)),
         "encoder_hidden_states": ((1, 77, 32), (2, 77, 32), (2, 77, 32))}]
    vae = _manifest([("latents", [1, 4, "latent_height", "latent_width"])],
                    {"latent_height": [8, 6], "latent_width": [8, 10]}, sizes=((64, 64), (48, 80)))
    assert optimization_profiles(vae, "unet") == [{"latents": ((1, 4, 8, 8),) * 3}, {"latents": ((1, 4, 6, 10),) * 3}]
    with pytest.raises(EngineFolderError, match=r"components\.unet\.dim_values lacks the sizes of unet_batch"):
        _manifest([("sample", ["unet_batch", 4])], {}).component("unet").dim_values


def test_no_gpu_imports():
    """Importing the builder, the backend and the runtime must not import TensorRT or CUDA libraries."""
    code = ("import sys, lcmrt, lcmrt.engines.tensorrt, lcmrt.engines.fp16, lcmrt.backends.tensorrt;"
            "bad=[m for m in ('tensorrt','cupy','cuda','pycuda','polygraphy') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
