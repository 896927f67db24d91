"""What lcmrt builds on top of an engine folder's fp32 ONNX graphs, in one call: this CPU's pre-optimized ONNX
Runtime graphs, OpenVINO models, the fastest CPU backend per component (measured here), FP16 and INT8 graph
variants and int8-weight OpenVINO models (with their measured fidelity) and TensorRT engines.

`lcmrt build` runs it inside the new folder before it is renamed into place (`lcmrt.export.build`), and
`lcmrt build --engines-only FOLDER` on an existing folder; Python callers do the same through
`BuildRequest(engines=EngineRequest(...))` or `add_engines(folder, EngineRequest(...))`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError, InputError
from ..folder_update import changing, commit
from ..manifest import Manifest, read_manifest
from ..progress import Stages

ENGINE_BACKENDS = ("onnxruntime", "tensorrt")


@dataclass
class EngineRequest:
    backend: str = "onnxruntime"  # "tensorrt" also builds TensorRT engines for this GPU
    ort_cpu_graphs: bool = True  # this CPU's pre-optimized ONNX Runtime graphs (fast session creation)
    openvino: bool | None = None  # OpenVINO models for the openvino backend; None: where OpenVINO is installed
    # time each CPU backend per component and record the fastest for backend "auto"; None: with backend
    # "onnxruntime" where a second CPU backend (OpenVINO) is installed
    choose_backends: bool | None = None
    fp16: bool | None = None  # FP16 text encoder and UNet graphs; None: only with backend "tensorrt"
    fp16_vae: bool = False  # an FP16 VAE decoder too
    int8: bool = False  # an INT8 UNet graph (lossy, faster on CPUs), and an int8-weight OpenVINO UNet with `openvino`
    workspace: str | int = "2G"  # TensorRT builder workspace limit

    @property
    def wants_fp16(self) -> bool:
        return self.fp16 if self.fp16 is not None else self.backend == "tensorrt"


def check_engine_request(req: EngineRequest, refittable: bool) -> None:
    """Cheap checks before any work (a full-size export takes minutes). `refittable`: the folder keeps
    adapters swappable at run time."""
    if req.backend not in ENGINE_BACKENDS:
        raise InputError(f"backend {req.backend!r} is not one of {', '.join(ENGINE_BACKENDS)}.")
    if req.backend == "tensorrt":
        from ..backends.tensorrt import INSTALL_HINT, TensorRTBackend

        if not TensorRTBackend.installed():
            raise BackendError(f"--backend tensorrt needs TensorRT and CuPy on this machine. {INSTALL_HINT}")
    if req.openvino:
        from .openvino_ir import openvino_installed

        if not openvino_installed():
            from ..backends.openvino import INSTALL_HINT

            raise BackendError(f"--openvino needs OpenVINO on this machine. {INSTALL_HINT}")
    if req.choose_backends:
        from ..backends.chosen import installed_cpu_backends

        if len(installed_cpu_backends()) < 2:
            from ..backends.openvino import INSTALL_HINT

            raise BackendError(f"--choose-backends compares CPU backends, and only ONNX Runtime is installed here: "
                               f"OpenVINO is the other. {INSTALL_HINT}")
    if req.int8 and refittable:
        raise InputError("--int8 replaces the UNet's weights with quantized ones, which --refittable and "
                         "--refittable-lcm keep swappable: leave out one or the other.")
    if req.int8 and wants_openvino(req):
        from .openvino_int8 import INSTALL_HINT, nncf_installed

        if not nncf_installed():
            raise BackendError(f"--int8 also compresses the OpenVINO UNet's weights, with NNCF, which is not "
                               f"installed here. {INSTALL_HINT}")


def wants_openvino(req: EngineRequest) -> bool:
    """Does the build save OpenVINO models (asked for, or by default where OpenVINO is installed)?"""
    if req.openvino is not None:
        return req.openvino
    from .openvino_ir import openvino_installed

    return openvino_installed()


def add_engines(folder: str | Path, req: EngineRequest, stages: Stages | None = None, log=None) -> dict:
    """Build what `req` asks for into the engine folder `folder`, recording each in its manifest; return the
    manifest. `log` (a print-like callable) receives the backend choice's figures and the TensorRT builder's
    messages."""
    folder = Path(folder)
    stages = stages or Stages()
    check_engine_request(req, bool(read_manifest(folder).refit_map))
    with changing(folder) as manifest:  # each stage commits its own graphs: an interruption loses only its own
        return _add_engines(folder, manifest, req, stages, log)


def _add_engines(folder: Path, manifest: Manifest, req: EngineRequest, stages: Stages, log) -> dict:
    from .refit_factors import factor_graphs_current, write_factor_graphs

    if not factor_graphs_current(folder, manifest):  # a folder built before them, or whose adapters outgrew them
        with stages.stage("refit factor graphs"):
            write_factor_graphs(folder, manifest)
            commit(folder, manifest)
    if req.ort_cpu_graphs:
        from .ort_optimize import optimize_folder

        with stages.stage("optimize CPU graphs"):
            optimize_folder(folder, manifest)
            commit(folder, manifest)
    if wants_openvino(req):
        from .openvino_ir import save_folder

        with stages.stage("OpenVINO models"):
            save_folder(folder, manifest)
            commit(folder, manifest)
    if req.choose_backends or (req.choose_backends is None and req.backend == "onnxruntime"):
        from ..backends.chosen import installed_cpu_backends
        from .backend_choice import choose_backends

        if len(installed_cpu_backends()) > 1:
            with stages.stage("choose CPU backends"):
                choose_backends(folder, manifest, log=log)
                commit(folder, manifest)
    if req.wants_fp16:
        from .fp16 import convert_folder, default_fp16_components, record_variants

        with stages.stage("FP16 graphs"):
            components = default_fp16_components(manifest) + (("vae_decoder",) if req.fp16_vae else ())
            record_variants(folder, convert_folder(folder, components))
            manifest = read_manifest(folder)
    if req.int8:
        from .quantize import quantize_folder

        with stages.stage("INT8 graphs"):
            quantize_folder(folder, manifest)
            commit(folder, manifest)
        if wants_openvino(req):
            from .openvino_int8 import compress_folder

            with stages.stage("OpenVINO INT8 models"):
                compress_folder(folder, manifest)
                commit(folder, manifest)
    if req.backend == "tensorrt":
        from .tensorrt import build_engines

        with stages.stage("TensorRT engines"):
            build_engines(folder, precision="fp16" if req.fp16 is not False else "fp32", workspace=req.workspace,
                          log=log or (lambda *_: None))
        manifest = read_manifest(folder)
    return manifest.data


__all__ = ["ENGINE_BACKENDS", "EngineRequest", "add_engines", "check_engine_request", "wants_openvino"]
