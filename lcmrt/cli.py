"""The `lcmrt` command. Thin: parse options, show progress, call the same functions the Python API exposes.

Build-stage commands import `lcmrt.export` lazily so that the runtime commands work without torch.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np

from .errors import LcmrtError


class _Group(click.Group):
    """Print lcmrt's own errors as one paragraph; `--debug` shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LcmrtError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="lcmrt")
@click.pass_context
def cli(ctx, debug):
    """Compile Stable Diffusion + LCM-LoRA into engine folders and generate images from them."""
    ctx.obj = {"debug": debug}


@cli.command("random-model")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--arch", type=click.Choice(["sd15", "sdxl", "ssd1b"]), default="sd15", show_default=True, help="Model family.")
@click.option("--size", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True,
              help="tiny: seconds to build, for tests; full: the real architecture, for benchmarks.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--taesd", is_flag=True, help="Also a random tiny VAE (AutoencoderTiny) in OUT/taesd, for --vae-decoder.")
@click.option("--inpaint", is_flag=True, help="A 9-channel inpainting UNet (latents, mask, masked-image latents), "
              "like stable-diffusion-inpainting.")
def random_model(out, arch, size, seed, overwrite, taesd, inpaint):
    """Write a random-weight model of a real architecture plus LCM and style LoRAs to OUT."""
    from .export.random_model import write_random_model

    paths = write_random_model(out, arch=arch, size=size, seed=seed, overwrite=overwrite, taesd=taesd,
                               inpaint=inpaint)
    for role, path in paths.items():
        note = " (inpainting, 9-channel UNet)" if inpaint and role == "model" else ""
        click.echo(f"{role:>10}: {path}{note}")


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _console(quiet: bool):
    from rich.console import Console

    return None if quiet else Console(stderr=True)


@cli.command()
@click.argument("model", required=False)
@click.option("--lcm-lora", "lcm_lora", help="The LCM-LoRA file (kohya, diffusers or peft format). Required unless "
              "MODEL is a distilled LCM model (its UNet takes the guidance scale as an input).")
@click.option("--lcm-weight", default=1.0, show_default=True, help="Weight of the LCM-LoRA.")
@click.option("--lora", "loras", multiple=True, metavar="[NAME=]PATH[:WEIGHT]",
              help="A style LoRA to fuse, optionally named and weighted; repeatable.")
@click.option("--height", type=int, default=None, help="Image height in pixels (multiple of 8)  [default: 512]")
@click.option("--width", type=int, default=None, help="Image width in pixels (multiple of 8)  [default: 512]")
@click.option("--size", "sizes", multiple=True, metavar="WIDTHxHEIGHT",
              help="A size to serve, e.g. 1024x1024; repeat for several sizes in one folder (weights stored "
                   "once; the first is the default). Instead of --height/--width.")
@click.option("--batch", default=1, show_default=True, help="Images per call.")
@click.option("--guidance-mode", type=click.Choice(["none", "cfg"]), default="none", show_default=True,
              help="cfg also builds the unconditional batch, for guidance_scale > 1.")
@click.option("--out", type=click.Path(path_type=Path), help="Engine folder to write. Required.")
@click.option("--config", help="Diffusers folder or config for a single-file checkpoint (needed offline).")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .ckpt/.bin/.pt files (they can run code).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--refittable", is_flag=True,
              help="Keep the --lora adapters unfused, swappable at run time (set_adapters, --adapter).")
@click.option("--refittable-lcm", is_flag=True, help="Keep the LCM-LoRA unfused too, so its weight can change.")
@click.option("--ort-cpu-graphs/--no-ort-cpu-graphs", default=True, show_default=True,
              help="Also save ONNX Runtime's optimized CPU graphs, so sessions load in seconds (more disk).")
@click.option("--openvino/--no-openvino", default=None,
              help="Also save OpenVINO models for backend 'openvino' (more disk; default: where OpenVINO is "
                   "installed).")
@click.option("--choose-backends/--no-choose-backends", default=None,
              help="Time each CPU backend (ONNX Runtime, OpenVINO) on each component here and record the fastest, "
                   "which backend 'auto' then runs on CPUs of this class (default: where OpenVINO is installed).")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt also builds TensorRT engines (on the GPU that will run them).")
@click.option("--engines-only", type=click.Path(path_type=Path), default=None, metavar="FOLDER",
              help="Build this machine's engines for an existing folder: TensorRT engines (and FP16 graphs) "
                   "with --backend tensorrt, else ONNX Runtime's optimized CPU graphs.")
@click.option("--fp16/--no-fp16", default=None,
              help="Write FP16 text encoder and UNet graphs (default: on with --backend tensorrt).")
@click.option("--fp16-vae", is_flag=True, help="Also an FP16 VAE decoder (NaN output falls back to fp32).")
@click.option("--int8", is_flag=True,
              help="Also an INT8 UNet graph, and where OpenVINO models are saved an int8-weight OpenVINO UNet (lossy, "
                   "faster on CPU; fidelity vs fp32 is measured and printed); run them with precision='int8'.")
@click.option("--vae-decoder", "vae_decoder", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="Decode with this AutoencoderTiny folder (TAESD) instead of the model's VAE: much less "
                   "compute, lower fidelity.")
@click.option("--tiny-vae", "tiny_vae", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="Also this AutoencoderTiny folder's encoder and decoder (TAESD), for fast img2img and streams "
                   "(tiny_vae=True); the model's VAE stays the default.")
@click.option("--stream-batch", type=click.IntRange(1, 8), default=None, metavar="N",
              help="Also a UNet batch of N frames at staggered timesteps, for pipe.stream(): N = the denoising "
                   "steps a frame takes (4 steps at strength 0.5: 2).")
@click.option("--workspace", default="2G", show_default=True,
              help="TensorRT builder workspace limit, e.g. 1G on Jetson or 8 GB cards.")
@click.option("--quiet", is_flag=True, help="No progress or summary output.")
def build(model, lcm_lora, lcm_weight, loras, height, width, sizes, batch, guidance_mode, out, config, allow_pickle,
          overwrite, refittable, refittable_lcm, ort_cpu_graphs, openvino, choose_backends, backend, engines_only, fp16,
          fp16_vae, int8, vae_decoder, tiny_vae, stream_batch, workspace, quiet):
    """Fuse LoRAs into MODEL and export a validated static-shape engine folder."""
    import signal

    from .engines.build import EngineRequest, add_engines
    from .errors import InputError
    from .progress import Stages

    # SIGTERM unwinds like Ctrl-C, so the partial folder is removed
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    console = _console(quiet)
    stages = Stages(console)
    log = console.print if console is not None else None
    engines = EngineRequest(backend=backend, ort_cpu_graphs=ort_cpu_graphs, openvino=openvino,
                            choose_backends=choose_backends, fp16=fp16, fp16_vae=fp16_vae, int8=int8, workspace=workspace)
    if engines_only is not None:
        if model or lcm_lora or out or vae_decoder or tiny_vae or stream_batch:
            raise InputError("--engines-only FOLDER works on an existing folder: leave out MODEL, --lcm-lora, --out, "
                             "--vae-decoder, --tiny-vae and --stream-batch.")
        folder = engines_only
        # a GPU machine building its engines leaves the folder's CPU graphs as they are
        engines.ort_cpu_graphs = ort_cpu_graphs and backend == "onnxruntime"
        engines.openvino = openvino if backend == "onnxruntime" else bool(openvino)
        engines.choose_backends = choose_backends if backend == "onnxruntime" else bool(choose_backends)
        manifest = add_engines(folder, engines, stages, log)
    else:
        missing = [name for name, value in (("MODEL", model), ("--out", out)) if not value]
        if missing:
            raise InputError(f"lcmrt build needs {', '.join(missing)} (or --engines-only FOLDER). See `lcmrt build --help`.")
        from .export.build import BuildRequest, build_engine_folder
        from .export.lora import LoraSpec, parse_lora_arg

        if sizes and (height or width):
            raise InputError("Give the size either as --size WIDTHxHEIGHT (repeatable) or as --height/--width, "
                             "not both.")
        request = BuildRequest(
            model=model, out=out,
            lcm_lora=LoraSpec(path=Path(lcm_lora), weight=lcm_weight, name="lcm", role="lcm") if lcm_lora else None,
            loras=[parse_lora_arg(text, role="style") for text in loras], height=height or 512, width=width or 512,
            sizes=[parse_size(text) for text in sizes], batch=batch,
            guidance_mode=guidance_mode, config=config, allow_pickle=allow_pickle, overwrite=overwrite,
            refittable=refittable, refittable_lcm=refittable_lcm, vae_decoder=vae_decoder, tiny_vae=tiny_vae,
            stream_batch=stream_batch, engines=engines)
        manifest = build_engine_folder(request, stages, log)
        folder = out
        if console is not None:
            _print_build_summary(console, out, manifest)
    if console is not None:
        _print_variant_fidelity(console, manifest, [v for v, wanted in (
            ("fp16", engines.wants_fp16), ("int8", int8), ("openvino-int8", int8)) if wanted], here=True)


def _print_variant_fidelity(console, manifest: dict, variants: list[str], here: bool = False) -> None:
    """One line per fp16/int8 variant: its outputs against the fp32 graph or model, as measured at build (`here`:
    on this machine, just now)."""
    from .cpu import has_int8_vnni
    from .manifest import Manifest

    for name, component in Manifest(manifest).components.items():
        for variant in variants:
            fidelity = component.variants[variant].data.get("fidelity") if variant in component.variants else None
            if fidelity is None:
                continue
            for output, diff in fidelity["outputs"].items():
                line = (f"{name} {variant} vs fp32: {output} max abs diff {diff['max_abs_diff']:.2e} "
                        f"({100 * diff['relative']:.2f}% of its peak)")
                if diff.get("psnr_db"):
                    line += f", PSNR {diff['psnr_db']:.1f} dB"
                if not fidelity["finite"]:
                    line += " [red]non-finite output[/red]"
                if "measured_on" in fidelity:
                    vnni = f"{'with' if has_int8_vnni(fidelity['measured_on']['isa']) else 'without'} VNNI"
                    line += f", measured on this CPU ({vnni})" if here else f", measured on a CPU {vnni}"
                console.print(line)


def _print_build_summary(console, out: Path, manifest: dict) -> None:
    from rich.table import Table

    from .manifest import Manifest

    m = Manifest(manifest)
    table = Table(title=f"{out}  ({_folder_size(out) / 1e6:.1f} MB)")
    for column in ("component", "size MB", "params", "max abs diff vs torch", "export s"):
        table.add_column(column, justify="right" if column != "component" else "left")
    seconds = manifest["build"]["seconds"]
    for name, entry in m.components.items():
        size = sum((out / f).stat().st_size for f in entry.graph_fp32.sha256)
        table.add_row(name, f"{size / 1e6:.1f}", _millions(entry.number("parameters")),
                      _diff(entry), f"{seconds.get(f'export {name}', 0):.1f}")
    console.print(table)
    adapters = ", ".join(f"{a.name}:{a.weight:g} ({'fused' if a.fused else 'refittable'})" for a in m.adapters)
    console.print(f"adapters: {adapters}; total {sum(seconds.values()):.1f} s")
    console.print(f"[bold]engine folder:[/bold] {out}")


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--negative-prompt", default=None, help="Used when --guidance > 1 (default: empty).")
@click.option("--steps", default=4, show_default=True, help="LCM steps (2-8 is the useful range).")
@click.option("--guidance", default=1.0, show_default=True, help="> 1 needs a folder built with --guidance-mode cfg.")
@click.option("--seed", type=int, default=None, help="Random seed (default: random, recorded in the PNG).")
@click.option("--num-images", default=1, show_default=True)
@click.option("--backend", default="auto", show_default=True, help="auto, onnxruntime, openvino, onnxruntime-cuda, tensorrt, ...")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Run the folder's fp16 or int8 graphs where it has them (default fp32): fp16 and int8 on ONNX "
                   "Runtime, int8 (int8-weight models) on --backend openvino.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME:WEIGHT",
              help="Set a swappable adapter's weight (repeatable); given any, the others are switched off.")
@click.option("--size", default=None, metavar="WIDTHxHEIGHT",
              help="One of the folder's sizes (`lcmrt info` lists them; default: its first).")
@click.option("--image", "image", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="img2img: start from this image (resized to the output size with Lanczos if it differs).")
@click.option("--strength", type=float, default=None,
              help="With --image: how much of the schedule runs, in (0, 1]  [default: 0.8; 1.0 with --mask]")
@click.option("--mask", "mask", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="Inpainting: repaint the white region of this mask, keep the black one (with --image).")
@click.option("--mask-blur", type=float, default=0.0, show_default=True, help="Gaussian blur radius of the mask.")
@click.option("--tiny-vae", is_flag=True, help="Encode and decode with the folder's tiny VAE (build --tiny-vae).")
@click.option("-o", "--output", "output", default="out.png", show_default=True, type=click.Path(path_type=Path),
              help="PNG path (*.png; missing folders are created); with several images, -0, -1, ... are appended "
                   "to the name.")
def generate(folder, prompt, negative_prompt, steps, guidance, seed, num_images, backend, precision, adapters,
             size, image, strength, mask, mask_blur, tiny_vae, output):
    """Generate images for PROMPT with the engine folder FOLDER (with --image: img2img; with --mask too:
    inpainting)."""
    from .errors import InputError
    from .image_inputs import image_size
    from .images import check_png_path, save_png
    from .pipeline import Pipeline, check_request

    # every argument is checked before the folder is loaded: a mistake fails at once, not after the load
    check_request(prompt, negative_prompt, steps, guidance, seed, num_images)
    if image is None and (strength is not None or mask is not None):
        raise InputError("--strength and --mask edit an image: pass --image PATH as well.")
    for path in (image, mask):
        if path is not None:
            image_size(path)  # readable as an image
    paths = [output] if num_images == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}")
                                               for i in range(num_images)]
    for path in paths:
        check_png_path(path)
    weights = _adapter_weights(adapters) if adapters else None
    height, width = parse_size(size) if size else (None, None)
    load_start = time.perf_counter()
    options = {"precision": precision} if precision else {}
    pipe = Pipeline.load(folder, backend=backend, adapters=weights, **options)
    load_seconds = time.perf_counter() - load_start
    edit = {} if image is None else {"image": image, "strength": strength, "mask_image": mask, "mask_blur": mask_blur}
    images = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                  seed=seed, num_images=num_images, height=height, width=width, tiny_vae=tiny_vae, **edit)
    metadata = pipe.png_metadata(prompt, negative_prompt, steps, guidance)
    if image is not None:
        metadata.update({"image": str(image), "strength": pipe.last_strength, "mask": None if mask is None else str(mask),
                         "mask_blur": mask_blur})
    for image, path in zip(images, paths):
        save_png(image, path, metadata)
    t = pipe.last_timings
    steps_s = t["unet_steps"]
    encode = f"VAE encode {t['vae_encode']:.3f} s | " if "vae_encode" in t else ""
    click.echo(f"load {load_seconds:.2f} s | text encoder {t['text_encoder']:.3f} s | {encode}"
               f"UNet {np.median(steps_s):.3f} s/step x {len(steps_s)} | VAE decode {t['vae_decode']:.3f} s | "
               f"total {t['total']:.2f} s (seed {pipe.last_seed})", err=True)
    for path in paths:
        click.echo(str(path))


def parse_size(text: str) -> tuple[int, int]:
    """--size WIDTHxHEIGHT as (height, width)."""
    from .errors import InputError

    width, x, height = text.lower().partition("x")
    if not (x and width.strip().isdigit() and height.strip().isdigit()):
        raise InputError(f"--size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1024x1024 or 896x1152.")
    return int(height), int(width)


def _adapter_weights(texts) -> dict[str, float]:
    """--adapter NAME:WEIGHT (or NAME, for weight 1) options as {name: weight}."""
    import math

    from .errors import InputError

    weights = {}
    for text in texts:
        name, colon, weight = text.rpartition(":")
        if not colon:  # a bare NAME
            name, weight = text, "1"
        try:
            value = float(weight)
        except ValueError:
            value = None
        if not name or value is None:
            raise InputError(f"--adapter {text!r}: expected NAME:WEIGHT, e.g. papercut:0.8.")
        if not math.isfinite(value):
            raise InputError(f"--adapter {text!r}: the weight must be a finite number, e.g. papercut:0.8.")
        if name in weights:
            raise InputError(f"--adapter {name} is given twice ({name}:{weights[name]:g} and {text}); give each "
                             "adapter once.")
        weights[name] = value
    return weights


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
def info(folder, as_json):
    """Describe the engine folder FOLDER."""
    import json

    from rich.console import Console
    from rich.table import Table

    from .manifest import read_manifest

    manifest = read_manifest(folder)
    if as_json:
        click.echo(json.dumps(manifest.data, indent=2))
        return
    console = Console(width=None if sys.stdout.isatty() else 160)  # piped: no 80-column truncation
    s, raw = manifest.shapes, manifest.data
    console.print(f"[bold]{folder}[/bold]: {manifest.family} engine folder, format {raw['format_version']}, "
                  f"built {_shown(raw, 'build', 'created')} with lcmrt {_shown(raw, 'versions', 'lcmrt')}")
    console.print(f"source: {_shown(raw, 'source', 'kind')} {_shown(raw, 'source', 'id')}"
                  + (f" (sha256 {_shown(raw, 'source', 'sha256')[:12]})" if _shown(raw, 'source', 'sha256') != "?" else ""))
    console.print(f"shape: {s.width}x{s.height} px" + (f" (sizes {s.size_names})" if len(s.sizes) > 1 else "")
                  + f", batch {s.batch}, latent {s.latent_channels}x"
                  f"{s.latent_height}x{s.latent_width}, UNet batches {list(s.unet_batch_sizes)}"
                  + (f" (stream batch {s.stream_batch})" if s.stream_batch else "")
                  + f"; guidance mode {manifest.guidance_mode}")
    cfg = manifest.scheduler_config
    console.print(f"scheduler: {_shown(raw, 'scheduler', 'class')} ({_shown(cfg, 'beta_schedule')} "
                  f"{_shown(cfg, 'beta_start')}..{_shown(cfg, 'beta_end')}, {_shown(cfg, 'prediction_type')}, "
                  f"original_inference_steps {_shown(cfg, 'original_inference_steps')}, timestep_scaling "
                  f"{_shown(cfg, 'timestep_scaling')})")
    table = Table("component", "file", "precision", "params", "GFLOP", "max abs diff vs torch", "variants")
    for name, entry in manifest.components.items():
        flops = entry.number("flops")
        table.add_row(name, entry.file, entry.precision, _millions(entry.number("parameters")),
                      "?" if flops is None else f"{flops / 1e9:.1f}", _diff(entry), ", ".join(entry.variants) or "-")
    console.print(table)
    _print_variant_fidelity(console, raw, ["fp16", "int8", "openvino-int8"])
    _print_backend_choice(console, folder, manifest)
    adapters = Table("adapter", "role", "weight", "fused", "format", "modules")
    for a in manifest.adapters:
        adapters.add_row(a.name, _shown(a.data, "role"), f"{a.weight:g}", str(a.fused), _shown(a.data, "format"),
                         _modules(a))
    console.print(adapters)


def _print_backend_choice(console, folder: Path, manifest) -> None:
    """The build's CPU backend per component, its figures, and whether backend "auto" follows it here."""
    from rich.table import Table

    from .backends.chosen import describe_cpu, not_followed

    choice = manifest.backend_choice
    if choice is None:
        console.print("CPU backend per component: not measured (`lcmrt build --engines-only FOLDER "
                      "--choose-backends` measures it where OpenVINO is installed)")
        return
    raw = choice.data
    versions = raw.get("versions") if isinstance(raw.get("versions"), dict) else {}
    console.print(f"CPU backend per component, measured {_shown(raw, 'measured')} on {describe_cpu(choice.cpu)}, "
                  f"{_shown(raw, 'threads')} threads, "
                  + ", ".join(f"{k} {_shown(versions, k)}" for k in versions)
                  + f"; median of {_shown(raw, 'runs')} runs:")
    backends = sorted({b for entry in choice.components.values() for b in entry.seconds})
    table = Table("component", "backend (auto)", *(f"{b} ms" for b in backends), *(f"{b} MB held" for b in backends),
                  "max abs diff")
    for name, entry in choice.components.items():
        table.add_row(name, entry.backend,
                      *(f"{entry.seconds[b] * 1e3:.1f}" if b in entry.seconds else "-" for b in backends),
                      *(f"{entry.resident_bytes[b] / 1e6:.0f}" if b in entry.resident_bytes else "-" for b in backends),
                      ", ".join(f"{b} {d:.1e}" for b, d in entry.max_abs_diff.items()) or "-")
    console.print(table)
    reason = not_followed(folder, choice)
    console.print("backend 'auto' follows it on this machine" if reason is None else f"[yellow]{reason}[/yellow]")


def _millions(n: float | None) -> str:
    return "?" if n is None else f"{n / 1e6:.2f}M"


def _diff(component) -> str:
    """A component's export validation: max abs diff of ONNX Runtime against torch."""
    diff = _recorded(component.data, "validation", "max_abs_diff")
    return f"{diff:.2e}" if isinstance(diff, float) else "?"  # an int may be too large to format as one


def _recorded(entry, *keys):
    """A manifest's informational field (source, build, versions, ...): None where it, or an object on the way to
    it, is missing or of another type. The runtime does not depend on these: they are shown, not validated."""
    for key in keys:
        if not isinstance(entry, dict):
            return None
        entry = entry.get(key)
    return entry if isinstance(entry, (str, int, float)) and not isinstance(entry, bool) else None


def _shown(entry, *keys) -> str:
    value = _recorded(entry, *keys)
    return "?" if value is None else str(value)[:200]


def _modules(adapter, nonzero: bool = False) -> str:
    """An adapter's module counts per component, as recorded (informational: shown only where they are counts)."""
    modules = adapter.data.get("modules")
    if not isinstance(modules, dict):
        return "?"
    return ", ".join(f"{k} {v}" for k, v in modules.items() if isinstance(v, int) and (v or not nonzero))


@cli.group()
def adapter():
    """Add and list the swappable adapters of a refittable engine folder."""


@adapter.command("add")
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Adapter name (default: the file's stem).")
@click.option("--allow-pickle", is_flag=True, help="Allow a pickled .bin/.pt/.ckpt LoRA (it can run code).")
def adapter_add(folder, file, name, allow_pickle):
    """Convert the LoRA FILE (kohya, peft or diffusers format) into an adapter of FOLDER."""
    from .export.adapters import add_adapter
    from .export.lora import LoraSpec

    record = add_adapter(folder, LoraSpec(file, weight=0.0, name=name), allow_pickle=allow_pickle)
    click.echo(f"added adapter {record['name']!r} ({record['format']}, rank {', '.join(map(str, record['ranks']))}, "
               f"{sum(record['modules'].values())} modules) to {folder}; use it with "
               f"`lcmrt generate {folder} PROMPT --adapter {record['name']}:1.0`")


@adapter.command("list")
@click.argument("folder", type=click.Path(path_type=Path))
def adapter_list(folder):
    """List the adapters of FOLDER: fused ones and swappable ones with their default weights."""
    from .manifest import read_manifest

    for a in read_manifest(folder).adapters:
        kind = "fused" if a.fused else "refittable"
        ranks = a.data.get("ranks")
        ranks = "/".join(map(str, ranks)) if isinstance(ranks, list) and ranks else "?"
        click.echo(f"{a.name:<20} {kind:<10} weight {a.weight:<6g} rank {ranks} "
                   f"({_modules(a, nonzero=True)}) from {_shown(a.data, 'path')}")


@cli.command("bench")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--steps", default=4, show_default=True, help="LCM steps.")
@click.option("--guidance", default=1.0, show_default=True, help="> 1 needs a folder built with --guidance-mode cfg.")
@click.option("--repeats", default=3, show_default=True, help="Warm generations after the cold one.")
@click.option("--backend", default="auto", show_default=True, help="auto, onnxruntime, openvino, onnxruntime-cuda, tensorrt, ...")
@click.option("--prompt", default=None, help="Prompt to generate (default: a fixed one).")
@click.option("--gemm-size", default=4096, show_default=True, help="N of the N^3 fp32 GEMM measuring the peak.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the results here.")
def bench_command(folder, steps, guidance, repeats, backend, prompt, gemm_size, json_path):
    """Time FOLDER: cold start, time per stage, images/s, peak RSS and the fraction of the fp32 roofline."""
    import json

    from . import bench

    if repeats < 1:
        from .errors import InputError

        raise InputError(f"--repeats {repeats} must be at least 1.")
    result = bench.bench_folder(folder, backend=backend, steps=steps, guidance=guidance, repeats=repeats,
                                prompt=prompt or bench.DEFAULT_PROMPT, gemm_size=gemm_size)
    s = result["summary"]

    def spread(stat, unit="s"):
        return f"{stat['median']:.3f} {unit} (min {stat['min']:.3f}, max {stat['max']:.3f})" if stat else "-"

    roofline = s.get("roofline_fraction", {})
    shapes = result["shapes"]
    lines = [
        f"{folder}: {shapes['width']}x{shapes['height']}, batch {shapes['batch']}, {steps} steps, guidance "
        f"{guidance:g}, backend {result['backend']}, {repeats} warm runs",
        f"cold start      {s['cold_start_s']['median']:.2f} s (load {result['load_s']:.2f} s + first image "
        f"{result['first_image_s']:.2f} s) = {s['cold_over_warm']:.2f}x a warm generation",
        f"end to end      {spread(s['e2e_s'])}, {s['images_per_s']:.3f} images/s",
        f"text encoder    {spread(s['text_encoder_s'])}",
        f"UNet step       {spread(s['unet_step_s'])}, {roofline.get('unet_step', 0):.2f} of roofline",
        f"VAE decode      {spread(s['vae_decode_s'])}, {roofline.get('vae_decode', 0):.2f} of roofline",
    ]
    if s["overhead_per_step_s"]:
        lines.append(f"step overhead   {s['overhead_per_step_s']['median'] * 1e3:.2f} ms "
                     f"({100 * s['overhead_fraction_of_step']:.2f}% of a step: sampler + runtime outside the UNet)")
    lines.append(f"peak RSS        {s['peak_rss_bytes'] / 1e9:.2f} GB")
    lines.append(f"fp32 GEMM peak  {result['gemm_peak_gflops']:.1f} GFLOP/s (best of numpy and ONNX Runtime MatMul "
                 f"at {gemm_size}^3; roofline fraction = the manifest's FLOPs / (time x peak))")
    click.echo("\n".join(lines))
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1))
        click.echo(str(json_path))


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@cli.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="FOLDER [FOLDER ...]")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 serves every network the machine is on.")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port (7860 is the AUTOMATIC1111 web UI's).")
@click.option("--api-key", envvar="LCMRT_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on every endpoint but /health (or set LCMRT_API_KEY, which "
                   "other users cannot read from the process list).")
@click.option("--queue-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Requests that may wait; past that, requests are answered 429 with Retry-After.")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a request may wait in the queue; past that it is answered 503 and not run.")
@click.option("--backend", default="auto", show_default=True, help="auto, onnxruntime, openvino, onnxruntime-cuda, tensorrt, ...")
def serve(folders, host, port, api_key, queue_size, timeout, backend):
    """Serve the engine folders FOLDER over HTTP (the AUTOMATIC1111 web UI API subset and lcmrt's /v1/images),
    each as a model named after its folder. Needs the serve extra: pip install 'lcmrt[serve]'."""
    try:
        from .server import serve as run_server
    except ModuleNotFoundError as e:
        from .errors import InputError

        raise InputError(f"lcmrt serve needs the serve extra ({e}): pip install 'lcmrt[serve]'.") from e
    if host not in LOOPBACK_HOSTS and api_key is None:
        click.secho(f"warning: listening on {host} without --api-key: anyone who can reach this port can use it.",
                    fg="yellow", err=True)
    run_server(list(folders), host=host, port=port, api_key=api_key, queue_size=queue_size, timeout=timeout,
               backend=backend)


def main():
    cli(prog_name="lcmrt")
