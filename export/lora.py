"""Load LoRA files into a diffusers StableDiffusionPipeline, fuse them at chosen weights, and prove the fuse.

Loading and fusing go through diffusers/peft (`load_lora_weights`, `set_adapters`, `fuse_lora`), which already
read kohya, diffusers and peft key formats; nothing here converts key names. What this file adds is proof: it
reads each raw file itself, groups its keys into modules, finds the layer each module landed on by value (the
peft layer's `lora_A` is the file's down weight, up to a constant), and checks every fused weight against

    W_fused = W_before + sum_i weight_i * (alpha_i / rank_i) * up_i @ down_i

so that a silent no-op, a partial load or a wrong scale is a build error, not a subtly wrong engine.
LCM-LoRA: Luo et al., arXiv 2311.05556 (kohya format, rank 64, alpha != rank in the released files).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lcmrt.errors import InputError, LoraError
from lcmrt.manifest import MAX_ADAPTER_NAME, adapter_name_problem, file_sha256

ROLES = ("lcm", "style")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # those a pipeline has: SDXL's second text encoder
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")

# A fused weight must equal the independent reconstruction to FUSE_RTOL relative to the weight's largest
# magnitude. fp32 has eps 1.2e-7; peft and we compute B @ A in different orders, so exact fusions differ by a
# few eps (measured ~1e-7 on the tiny models). 1e-5 leaves ~100x margin, while a wrong alpha/rank scale or a
# skipped module moves the weight by the LoRA's own relative size (1e-3..1e-1 for real LoRAs).
FUSE_RTOL = 1e-5
# Matching a file module to a model layer by direction: same data up to a constant gives cosine 1 - O(eps);
# unrelated random factors of even a few dozen entries sit far below this.
MATCH_COS = 1.0 - 1e-4
_FEW = 5  # how many names an error message lists

_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
# (regex, format, part); group 1 is the module name
_KEY_PATTERNS = (
    (re.compile(r"^(.+)\.lora_down\.weight$"), "kohya", "down"),
    (re.compile(r"^(.+)\.lora_up\.weight$"), "kohya", "up"),
    (re.compile(r"^(.+)\.lora_A\.weight$"), "peft", "down"),
    (re.compile(r"^(.+)\.lora_B\.weight$"), "peft", "up"),
    (re.compile(r"^(.+)[._](?:lora|lora_linear_layer)\.down\.weight$"), "diffusers", "down"),
    (re.compile(r"^(.+)[._](?:lora|lora_linear_layer)\.up\.weight$"), "diffusers", "up"),
    (re.compile(r"^(.+)\.alpha$"), None, "alpha"),
)


@dataclass
class LoraSpec:
    """One LoRA to fuse: file, weight (lambda), adapter name (file stem by default) and role."""

    path: Path
    weight: float = 1.0
    name: str | None = None
    role: str = "style"

    def __post_init__(self):
        self.path = Path(self.path)
        if self.name is None:  # the file's stem, with what an adapter name cannot hold replaced by "_"
            stem = "".join(c if c.isalnum() or c in "_.+- " else "_" for c in self.path.stem.strip())
            self.name = ("_" + stem if stem[:1] in (".", "+", "-", " ") else stem)[:MAX_ADAPTER_NAME] or "lora"
        if not isinstance(self.name, str) or (problem := adapter_name_problem(self.name)):
            raise InputError(f"The adapter name {self.name!r} for {self.path} "
                             f"{problem if isinstance(self.name, str) else 'is not a string'}. Choose another name "
                             "(`--name` for `lcmrt adapter add`, NAME=PATH for `--lora`).")
        if self.role not in ROLES:
            raise InputError(f"LoRA role must be one of {', '.join(ROLES)}, got {self.role!r} for {self.path}.")
        try:
            self.weight = float(self.weight)
        except (TypeError, ValueError):
            raise InputError(f"LoRA weight for {self.path} must be a number, got {self.weight!r}.") from None
        if not math.isfinite(self.weight):
            raise InputError(f"LoRA weight for {self.path} must be finite, got {self.weight}.")


def parse_lora_arg(text: str, role: str = "style") -> LoraSpec:
    """`PATH`, `PATH:WEIGHT`, `NAME=PATH` or `NAME=PATH:WEIGHT` -> LoraSpec.

    Only the text after the last ':' is a weight, and only if it parses as a float, so paths holding ':' work.
    """
    text = text.strip()
    if not text:
        raise InputError("Empty LoRA argument; expected PATH[:WEIGHT] or NAME=PATH[:WEIGHT].")
    name = None
    head, eq, rest = text.partition("=")
    if eq and re.fullmatch(r"[A-Za-z0-9_.-]+", head):
        name, text = head, rest
    weight = 1.0
    path, colon, tail = text.rpartition(":")
    if colon and path:
        try:
            weight = float(tail)
        except ValueError:
            path = text
    else:
        path = text
    if not path:
        raise InputError(f"LoRA argument {text!r} has no path; expected PATH[:WEIGHT] or NAME=PATH[:WEIGHT].")
    return LoraSpec(Path(path), weight, name, role)


@dataclass
class _FileModule:
    name: str  # module name as written in the file
    down: torch.Tensor  # fp32 [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # fp32 [out, r] or [out, r, 1, 1]
    alpha: float
    rank: int
    scale: float  # alpha / rank (alpha / sqrt(rank) for rsLoRA metadata)

    def delta(self) -> torch.Tensor:
        # up @ down flattened to [out, in*kh*kw]; callers reshape to the weight's shape
        return self.up.flatten(1) @ self.down.flatten(1)


def read_lora_file(path: Path, allow_pickle: bool = False) -> tuple[dict, dict]:
    """The raw tensors of a LoRA file and its diffusers adapter metadata ({} if none)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"LoRA file {path} does not exist (or is not a file). Check the path.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoraError(
                f"LoRA file {path} is a pickled checkpoint ({path.suffix}); pickles can run code when loaded, so "
                "they are refused. Convert it to .safetensors, or pass allow_pickle=True (--allow-pickle) if you "
                "trust its source.")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise LoraError(f"Could not read pickled LoRA file {path} with torch.load(weights_only=True): "
                            f"{_one_line(e)}.") from None
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise LoraError(f"Pickled LoRA file {path} does not hold a flat dict of tensors.")
        return sd, {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"LoRA file {path} is not a readable safetensors file: {_one_line(e)}.") from None
    return sd, _adapter_metadata(path, header.get("lora_adapter_metadata"))


def _adapter_metadata(path: Path, raw: str | None) -> dict:
    """diffusers' `lora_adapter_metadata` header ({} if none), checked where lcmrt reads it: per component
    (`unet.`, `text_encoder.`) a numeric `lora_alpha`, an `alpha_pattern` of {regex: alpha}, a boolean
    `use_rslora`."""
    if not raw:
        return {}
    try:
        metadata = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise LoraError(f"{path}: its lora_adapter_metadata header is not JSON ({_one_line(e)}). Re-save the LoRA "
                        "with diffusers, or remove the header to use alpha = rank.") from None
    if not isinstance(metadata, dict):
        raise LoraError(f"{path}: its lora_adapter_metadata header is not a JSON object. Re-save the LoRA.")

    def bad(key: str, expected: str) -> LoraError:
        return LoraError(f"{path}: lora_adapter_metadata {key!r} is {json.dumps(metadata[key])[:80]}, expected "
                         f"{expected}. Re-save the LoRA with diffusers.")

    for key, value in metadata.items():
        if key.endswith(".lora_alpha") and not _finite_number(value):
            raise bad(key, "a finite number")
        if key.endswith(".use_rslora") and not isinstance(value, bool):
            raise bad(key, "true or false")
        if key.endswith(".alpha_pattern"):
            if not isinstance(value, dict) or not all(_finite_number(v) for v in value.values()):
                raise bad(key, "an object of {module pattern: alpha}")
            for pattern in value:
                try:
                    re.compile(pattern)
                except (re.error, RecursionError, OverflowError) as e:
                    raise LoraError(f"{path}: lora_adapter_metadata {key!r} has the pattern {pattern[:80]!r}, "
                                    f"which is not a regular expression ({e}). Re-save the LoRA.") from None
    return metadata


def _finite_number(value) -> bool:
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:
        return False


def group_modules(path: Path, sd: dict, metadata: dict) -> tuple[str, dict[str, _FileModule]]:
    """Group a raw LoRA state dict into modules; return (format, {module name: module})."""
    parts: dict[str, dict] = {}
    formats, unknown = set(), []
    for key, value in sd.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        name, fmt, part = split
        parts.setdefault(name, {})[part] = value
        if fmt:
            formats.add(fmt)
    if unknown or not formats:
        few = ", ".join(unknown[:_FEW] or list(sd)[:_FEW]) or "(no tensors)"
        raise LoraError(
            f"{path} is not a LoRA file that lcmrt can fuse and verify: {len(unknown)} of {len(sd)} keys are not "
            f"LoRA keys (kohya lora_down/lora_up/alpha, peft lora_A/lora_B, or diffusers lora.down/lora.up), "
            f"e.g. {few}. DoRA, LoHa/LoKr and LoRA biases are not supported.")
    fmt = formats.pop() if len(formats) == 1 else "mixed"

    modules = {}
    for name, p in parts.items():
        if "down" not in p or "up" not in p:
            missing = "up" if "down" in p else "down" if "up" in p else "down and up"
            raise LoraError(f"{path}: module {name} has no {missing} weight; the file is truncated or not a LoRA.")
        down, up = p["down"].float(), p["up"].float()
        if down.dim() not in (2, 4) or up.dim() != down.dim() or 0 in down.shape or 0 in up.shape \
                or up.shape[2:] not in ((), (1, 1)):
            raise LoraError(f"{path}: module {name} has factors of shapes down {list(down.shape)} and up "
                            f"{list(up.shape)}; a LoRA module has down [rank, in] and up [out, rank] (or their "
                            "convolution forms [rank, in, kh, kw] and [out, rank, 1, 1]) with every size at least 1.")
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise LoraError(f"{path}: module {name} has down rank {rank} but up rank {up.shape[1]}.")
        alpha = p.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise LoraError(f"{path}: module {name} has an alpha of shape {list(alpha.shape)}; alpha is one number.")
        if not all(bool(torch.isfinite(t).all()) for t in (down, up) + (() if alpha is None else (alpha.float(),))):
            raise LoraError(f"{path}: module {name} holds NaN or infinite values; the file is damaged.")
        alpha, scale = _alpha_and_scale(name, rank, p.get("alpha"), metadata)
        modules[name] = _FileModule(name, down, up, alpha, rank, scale)
    return fmt, modules


def _split_key(key: str) -> tuple[str, str | None, str] | None:
    """(module name, format, part) of one LoRA key; None if it is no LoRA key."""
    for pattern, fmt, part in _KEY_PATTERNS:
        m = pattern.match(key)
        if m:
            return m.group(1), fmt, part
    return None


def _alpha_and_scale(name: str, rank: int, alpha_tensor, metadata: dict) -> tuple[float, float]:
    """Effective alpha for one module: its .alpha key, else diffusers' adapter metadata, else alpha = rank."""
    if alpha_tensor is not None:
        alpha = float(alpha_tensor.float().reshape(()))
        return alpha, alpha / rank
    component, _, local = name.partition(".")
    if metadata and f"{component}.lora_alpha" in metadata:
        alpha = float(metadata[f"{component}.lora_alpha"])
        for pattern, value in (metadata.get(f"{component}.alpha_pattern") or {}).items():
            # peft's rule (peft.utils.other.get_pattern_key): a pattern matches a suffix of the module name
            if re.match(rf"(.*\.)?({pattern})$", local):
                alpha = float(value)
                break
        rs = bool(metadata.get(f"{component}.use_rslora"))
        return alpha, alpha / (math.sqrt(rank) if rs else rank)
    return float(rank), 1.0


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    text = text if len(text) <= 300 else text[:300] + "..."
    return f"{type(e).__name__}: {text.rstrip('.')}"


def _wrapped_layers(pipe, adapter: str | None = None) -> dict[tuple[str, str], torch.nn.Module]:
    """{(component, module name): peft LoRA layer} holding `adapter` (any adapter if None)."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for mname, module in model.named_modules():
            if isinstance(module, LoraLayer) and (adapter is None or adapter in module.lora_A):
                layers[(comp, mname)] = module
    return layers


def _leaked_names(pipe) -> list[str]:
    leaks = []
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_modules()]
        leaks += [f"{comp}.{n}" for n in names if "base_layer" in n or "lora_" in n]
    return leaks


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (zero rows stay zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _match(spec: LoraSpec, modules: dict[str, _FileModule], layers: dict) -> dict[tuple[str, str], _FileModule]:
    """Pair file modules with the layers diffusers wrapped for this adapter, by the direction of (down, up)."""
    groups: dict[tuple, tuple[list, list]] = {}
    for fm in modules.values():
        groups.setdefault((tuple(fm.down.shape), tuple(fm.up.shape)), ([], []))[0].append(fm)
    for key, layer in layers.items():
        a, b = layer.lora_A[spec.name].weight, layer.lora_B[spec.name].weight
        groups.setdefault((tuple(a.shape), tuple(b.shape)), ([], []))[1].append((key, layer))

    matched, unmatched_file, unmatched_layers = {}, [], []
    for files, lays in groups.values():
        if not files or not lays:
            unmatched_file += [f.name for f in files]
            unmatched_layers += [".".join(k) for k, _ in lays]
            continue
        # [n, d]: each side as [down/|down|, up/|up|]; for equal data the cosine is 1 even with a zero up
        fvec = torch.cat([_unit(torch.stack([f.down.flatten() for f in files])),
                          _unit(torch.stack([f.up.flatten() for f in files]))], dim=1)
        with torch.no_grad():
            lvec = torch.cat([
                _unit(torch.stack([l.lora_A[spec.name].weight.detach().flatten() for _, l in lays])),
                _unit(torch.stack([l.lora_B[spec.name].weight.detach().flatten() for _, l in lays]))], 1)
        cos = _unit(fvec) @ _unit(lvec).T  # [files, layers]
        pairs = sorted(((cos[i, j].item(), i, j) for i in range(len(files)) for j in range(len(lays))
                        if cos[i, j] >= MATCH_COS), reverse=True)
        used_f, used_l = set(), set()
        for _, i, j in pairs:
            if i not in used_f and j not in used_l:
                used_f.add(i)
                used_l.add(j)
                matched[lays[j][0]] = files[i]
        unmatched_file += [f.name for i, f in enumerate(files) if i not in used_f]
        unmatched_layers += [".".join(k) for j, (k, _) in enumerate(lays) if j not in used_l]

    if unmatched_file or unmatched_layers:
        msg = (f"LoRA {spec.name!r} ({spec.path}) was not fully loaded: {len(unmatched_file)} of {len(modules)} "
               "modules in the file did not land on any layer of the model")
        if unmatched_file:
            msg += f" (e.g. {', '.join(sorted(unmatched_file)[:_FEW])})"
        if unmatched_layers:
            msg += (f", and {len(unmatched_layers)} layers diffusers wrapped match no module of the file "
                    f"(e.g. {', '.join(sorted(unmatched_layers)[:_FEW])})")
        msg += (". Fusing it would give a partial LoRA. Likely causes: a LoRA for another architecture (e.g. SDXL "
                "on SD1.5), a file mixing key formats (legacy diffusers attention keys with peft keys), or keys "
                "without the unet./text_encoder. prefix. Re-save the LoRA in one format for this model.")
        raise LoraError(msg)
    return matched


def _shape_misfits(pipe, modules: dict[str, _FileModule]) -> int:
    """How many file modules fit no Linear/Conv2d weight of the pipeline by shape ([out, in*kh*kw])."""
    shapes = set()
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        for m in (model.modules() if model is not None else ()):
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                shapes.add((m.weight.shape[0], m.weight[0].numel()))
    return sum((fm.up.shape[0], fm.down[0].numel()) not in shapes for fm in modules.values())


def fuse_loras(pipe, loras: list[LoraSpec], allow_pickle: bool = False) -> list[dict]:
    """Load, fuse at their weights and unload `loras` on an fp32 StableDiffusionPipeline, verifying every module.

    Returns one manifest record per LoRA. Raises LoraError (or InputError) on anything short of an exact fuse.
    """
    if not loras:
        return []
    names = [s.name for s in loras]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"Two LoRAs share the name {dup[0]!r}; give each a distinct name (NAME=PATH[:WEIGHT]).")
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is not None and any(p.dtype != torch.float32 for p in model.parameters()):
            raise LoraError(f"The pipeline's {comp} is not fp32; fuse LoRAs in fp32 and cast afterwards.")
    if _wrapped_layers(pipe) or _leaked_names(pipe) or getattr(pipe, "num_fused_loras", 0):
        raise LoraError("The pipeline already holds LoRA layers or fused LoRAs; load a fresh model before fusing, "
                        "or the LoRAs would be applied twice.")

    # Read and group every file before touching the pipeline, so bad files fail fast.
    files = []
    for spec in loras:
        sd, metadata = read_lora_file(spec.path, allow_pickle)
        fmt, modules = group_modules(spec.path, sd, metadata)
        files.append((spec, sd, fmt, modules))

    try:
        matches = []
        for spec, sd, fmt, modules in files:
            _load(pipe, spec, sd, modules)
            matches.append(_match(spec, modules, _wrapped_layers(pipe, spec.name)))

        # W_before of every wrapped layer, as loaded (loading does not change base weights)
        with torch.no_grad():
            before = {key: layer.get_base_layer().weight.detach().clone()
                      for key, layer in _wrapped_layers(pipe).items()}
        components = [c for c in COMPONENTS if any(k[0] == c for k in before)]
        try:
            pipe.set_adapters(names, adapter_weights=[s.weight for s in loras])
            pipe.fuse_lora(components=components, lora_scale=1.0, adapter_names=names)
            pipe.unload_lora_weights()
        except Exception as e:
            raise LoraError(f"diffusers failed to fuse LoRAs {', '.join(names)}: {_one_line(e)}. The model may be "
                            "partly fused; reload it before trying again.") from None
    except BaseException:
        if _wrapped_layers(pipe):
            pipe.unload_lora_weights()  # leave the model as it was: nothing fused yet
        raise

    leaks = _leaked_names(pipe)
    if leaks:
        raise LoraError(f"After fusing and unloading, {len(leaks)} LoRA names remain in the model "
                        f"(e.g. {', '.join(leaks[:_FEW])}); the fuse did not complete.")
    errors = _verify(pipe, loras, matches, before)

    return [_record(pipe, spec, fmt, modules, match, err)
            for (spec, sd, fmt, modules), match, err in zip(files, matches, errors)]


def locate_lora(pipe, spec: LoraSpec, allow_pickle: bool = False) -> tuple[dict, dict[tuple[str, str], _FileModule]]:
    """Find the layer each module of one LoRA targets, without fusing: diffusers loads it, the file's modules
    are matched to the wrapped layers by value, and the LoRA is unloaded again. Returns (record, matches)."""
    sd, metadata = read_lora_file(spec.path, allow_pickle)
    fmt, modules = group_modules(spec.path, sd, metadata)
    try:
        _load(pipe, spec, sd, modules)
        match = _match(spec, modules, _wrapped_layers(pipe, spec.name))
    finally:
        if _wrapped_layers(pipe):
            pipe.unload_lora_weights()
    return _record(pipe, spec, fmt, modules, match, None), match


def _record(pipe, spec: LoraSpec, fmt: str, modules: dict, match: dict, fuse_error: float | None) -> dict:
    """The manifest record of one LoRA: its modules counted per component of the pipeline."""
    return {
        "name": spec.name, "role": spec.role, "path": str(spec.path), "sha256": file_sha256(spec.path),
        "format": fmt, "weight": spec.weight,
        "modules": {c: sum(k[0] == c for k in match) for c in COMPONENTS if getattr(pipe, c, None) is not None},
        "ranks": sorted({m.rank for m in modules.values()}),
        "alphas": sorted({m.alpha for m in modules.values()}),
        "max_fuse_error": fuse_error,
    }


def _load(pipe, spec: LoraSpec, sd: dict, modules: dict[str, _FileModule]) -> None:
    # safetensors go by path so diffusers also reads the adapter metadata in the header
    source = str(spec.path) if spec.path.suffix.lower() not in PICKLE_SUFFIXES else dict(sd)
    try:
        pipe.load_lora_weights(source, adapter_name=spec.name)
    except Exception as e:
        failed = f"diffusers could not load LoRA {spec.name!r} ({spec.path}): {_one_line(e)}."
        unmappable = _unmappable(pipe, sd)
        if unmappable:
            raise LoraError(
                f"{failed} {len(unmappable)} of {len(modules)} modules in the file have names that diffusers cannot "
                f"map onto this model (e.g. {', '.join(sorted(unmappable)[:_FEW])}): they name blocks this model "
                "does not have, so the LoRA was made for another UNet layout or the file is damaged. Use a LoRA "
                "trained for this model, or remove those modules from the file.") from None
        misfit = _shape_misfits(pipe, modules)
        raise LoraError(
            f"{failed} {misfit} of {len(modules)} modules in the file fit no layer of this model by shape; the "
            "likely cause is a LoRA for another architecture (e.g. an SDXL LoRA on an SD1.5 model) or a damaged "
            "file.") from None


def _unmappable(pipe, sd: dict) -> list[str]:
    """File modules whose keys diffusers' name conversion (kohya and SGM block names -> diffusers) rejects on
    their own: its errors (e.g. 'Invalid middle block id 3.') name no key, so each module is tried alone."""
    keys: dict[str, list[str]] = {}
    for key in sd:
        split = _split_key(key)
        if split is not None:
            keys.setdefault(split[0], []).append(key)
    config = getattr(getattr(pipe, "unet", None), "config", None)
    bad = []
    for name, names in keys.items():
        try:
            pipe.lora_state_dict({k: sd[k] for k in names}, unet_config=config)
        except Exception:
            bad.append(name)
    return bad


def _verify(pipe, loras, matches, before) -> list[float]:
    """Check W_fused = W_before + sum_i weight_i * scale_i * up_i @ down_i for every wrapped layer."""
    updates: dict[tuple[str, str], list] = {key: [] for key in before}
    for spec, match in zip(loras, matches):
        for key, fm in match.items():
            updates[key].append((spec.weight, fm))
    per_layer = {}
    for key, w0 in before.items():  # one layer at a time, in place: full-size UNets stay within memory
        comp, mname = key
        expected = w0  # the snapshot is ours to overwrite
        for weight, fm in updates[key]:
            expected.add_(fm.delta().reshape(expected.shape), alpha=weight * fm.scale)
        fused = getattr(pipe, comp).get_submodule(mname).weight.detach()
        scale = expected.abs().max().clamp_min(1e-30)
        per_layer[key] = (expected.sub_(fused).abs_().max() / scale).item()
    (comp, mname), err = max(per_layer.items(), key=lambda kv: kv[1])
    if err > FUSE_RTOL:
        bad = sum(e > FUSE_RTOL for e in per_layer.values())
        raise LoraError(
            f"Fused weights do not match W + sum(weight * alpha/rank * up @ down): {bad} of {len(per_layer)} "
            f"layers differ, worst {comp}.{mname} with relative error {err:.2e} (tolerance {FUSE_RTOL:.0e}). "
            "diffusers/peft applied a different scale or skipped part of a LoRA; the engine would be wrong.")
    return [max((per_layer[k] for k in match), default=0.0) for match in matches]
