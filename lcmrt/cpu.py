"""What this CPU can do, for the choices that depend on it: pre-optimized ONNX Runtime graphs (keyed by
instruction set) and int8 graphs (accurate or not depending on the integer dot-product instructions).

int8 on x86: ONNX Runtime's MLAS multiplies uint8 activations by int8 weights (u8s8). Without VNNI (AVX2,
AVX-512 without VNNI) it uses `vpmaddubsw`, which adds two u8*s8 products into an int16 with saturation:
255 * 127 * 2 = 64770 does not fit, and results can clip. ONNX Runtime's quantization guide names this and
its remedies (`reduce_range`: 7-bit weights, 255 * 64 * 2 = 32640 fits; or u8u8). VNNI (`vpdpbusd`,
AVX-512 VNNI or AVX-VNNI) and AMX accumulate in int32 and do not saturate.
"""
from __future__ import annotations

import functools
import platform

# Flags that change which kernels ONNX Runtime picks (and so what a pre-optimized graph contains).
ISA_FLAGS = frozenset({"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                       "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve"})
# Integer dot products that accumulate u8*s8 in int32 without an int16 intermediate.
INT8_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# x86 SIMD whose u8s8 integer product (vpmaddubsw) saturates an int16 pair sum.
INT8_SATURATING_FLAGS = frozenset({"avx2", "avx512bw"})


def _cpuinfo_field(*keys: str) -> str:
    """The first /proc/cpuinfo line starting with one of `keys`, after its colon ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(keys)), ":")
    except OSError:
        return ""
    return line.split(":", 1)[1].strip()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The `flags` line of /proc/cpuinfo (empty where there is none)."""
    return frozenset(_cpuinfo_field("flags", "Features").split())


def cpu_description() -> dict:
    """The machine and the instruction-set flags of this CPU that matter to lcmrt's CPU graphs."""
    return {"machine": platform.machine(), "isa": sorted(cpu_flags() & ISA_FLAGS)}


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7B13"), or the platform's processor string where /proc/cpuinfo has none."""
    return _cpuinfo_field("model name", "Model", "Hardware") or platform.processor() or "unknown"


def cpu_class() -> dict:
    """What makes one CPU backend faster than another on a component: the machine, the CPU model and its
    instruction sets. The build's backend choice holds on CPUs of the same class."""
    return {**cpu_description(), "model": cpu_model()}


def has_int8_vnni(isa) -> bool:
    """Does a CPU with these flags have int32-accumulating int8 dot products (VNNI or AMX)?"""
    return bool(set(isa) & INT8_VNNI_FLAGS)


def int8_saturates(isa) -> bool:
    """Can ONNX Runtime's u8s8 integer products saturate on a CPU with these flags (x86 without VNNI)?"""
    return bool(set(isa) & INT8_SATURATING_FLAGS) and not has_int8_vnni(isa)


def int8_accuracy_warning(folder_name: str, variant: dict, isa) -> str | None:
    """Why an int8 graph variant (a manifest entry) may be inaccurate on a CPU with `isa`, or None: its weights
    use the full int8 range and this CPU's u8s8 products saturate (folders quantized before lcmrt used
    `reduce_range`). The fix is to quantize again."""
    if variant.get("quantization", {}).get("reduce_range") or not int8_saturates(isa):
        return None
    measured = variant.get("fidelity", {}).get("measured_on", {}).get("isa")
    where = f" (its fidelity was measured on a CPU with {', '.join(measured)})" if measured else ""
    return (f"{folder_name}/{variant['file']} has full-range int8 weights{where}; this CPU has no VNNI, so ONNX "
            "Runtime's u8s8 products can saturate and the int8 UNet lose accuracy (measured on the tiny UNet: "
            f"6.5% of its peak instead of 0.7%). Quantize again with 7-bit weights: "
            f"`lcmrt build --engines-only {folder_name} --int8`.")
