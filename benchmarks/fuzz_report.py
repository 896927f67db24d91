"""How lcmrt's readers take damaged inputs: seeded random mutations of a tiny refittable engine folder's
`manifest.json` and adapter pack, and of LoRA files, each given to the readers that take it, with the outcomes
counted by exception type per reader.

    python -m benchmarks.fuzz_report --examples 300 [--seed 0] [--workdir DIR] [--json results/fuzz.json]

The mutations and the contract are the fuzz tests' (tests/fuzz/mutations.py and outcomes.py): a reader
returns, or raises one of lcmrt's errors (`LcmrtError` subclasses; the CLI prints them as `error: ...` with
exit code 2). Anything else escaped, and is listed once per reader, exception type and place, with the
shortest mutation that raised it; so is a Pipeline.load that opened a file outside the folder. Builds the tiny
model and the folder first (~15 s on 2 cores); 300 examples of each kind take ~5 minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

MANIFEST_READERS = ("read_manifest", "Pipeline.load", "lcmrt info", "lcmrt adapter list")
PACK_READERS = ("AdapterBank.pack", "AdapterBank.weights_for", "Pipeline.load", "Pipeline.set_adapters")
LORA_READERS = ("read_lora_file + group_modules", "lcmrt adapter add", "fuse_loras")
LORA_FILES = {"style-lora.safetensors": ("style_lora", "style"), "lcm-lora.safetensors": ("lcm_lora", "lcm")}
TIME_LIMIT_S = 60  # per reader call: far above any tiny-folder reader, so only a hang reaches it
BACKEND = "onnxruntime-cpu"


class Tally:
    """Outcomes per reader, and the escapes: (reader, exception, place) -> the shortest mutation."""

    def __init__(self, readers):
        self.counts = {reader: Counter() for reader in readers}
        self.escapes: dict[tuple, str] = {}

    def add(self, reader: str, label: str, error, mutation) -> None:
        from tests.fuzz.outcomes import accepted, raised_at

        self.counts[reader][label] += 1
        if not accepted(label, error):
            key = (reader, label, raised_at(error) if error is not None else "-")
            if key not in self.escapes or len(str(mutation)) < len(self.escapes[key]):
                self.escapes[key] = str(mutation)


def _call(fn) -> tuple[str, BaseException | None]:
    from tests.fuzz.outcomes import outcome, time_limit

    with time_limit(TIME_LIMIT_S) as timer:
        result = outcome(fn)
    return ("TimeLimit", result[1]) if timer.expired else result


def _cli(args) -> tuple[str, BaseException | None]:
    from click.testing import CliRunner

    from lcmrt.cli import cli
    from tests.fuzz.outcomes import cli_outcome, time_limit

    with time_limit(TIME_LIMIT_S) as timer:
        result = cli_outcome(CliRunner().invoke(cli, [str(a) for a in args]))
    return ("TimeLimit", result[1]) if timer.expired else result


def _load_within(folder: Path, watched: Path, **kwargs):
    """Pipeline.load that fails (as a non-lcmrt error) if it opened a file outside the folder."""
    from lcmrt.pipeline import Pipeline
    from tests.fuzz.outcomes import OpenedFiles, ReadOutside, escaped

    with OpenedFiles() as opened:
        try:
            return Pipeline.load(folder, backend=BACKEND, **kwargs)
        finally:
            if outside := escaped(opened, folder, watched):
                raise ReadOutside(os.path.relpath(outside[0], watched))


def manifest_section(folder: Path, work: Path, n: int, seed: int) -> Tally:
    from lcmrt.manifest import MANIFEST_NAME, read_manifest
    from tests.fuzz.mutations import manifest_mutation

    path = folder / MANIFEST_NAME
    original = path.read_bytes()
    bait = work / "bait.txt"  # a file outside the folder that a mutated name may point at
    bait.write_text("not part of the engine folder\n")
    outside = (str(bait), os.path.relpath(bait, folder))
    tally = Tally(MANIFEST_READERS)
    for i in range(n):
        mutation = manifest_mutation(original, random.Random(f"{seed}:manifest:{i}"), outside)
        path.write_bytes(mutation.data)
        try:
            for reader, result in (("read_manifest", _call(lambda: read_manifest(folder))),
                                   ("Pipeline.load", _call(lambda: _load_within(folder, work))),
                                   ("lcmrt info", _cli(["info", folder])),
                                   ("lcmrt adapter list", _cli(["adapter", "list", folder]))):
                tally.add(reader, *result, mutation)
        finally:
            path.write_bytes(original)
    return tally


def _pack_record(doc: dict, pack: str) -> dict:
    return next(a for a in doc["adapters"] if a.get("pack") == pack)


def pack_section(folder: Path, work: Path, n: int, seed: int) -> Tally:
    import hashlib

    from lcmrt.adapters import AdapterBank
    from lcmrt.manifest import MANIFEST_NAME, read_manifest
    from tests.fuzz.mutations import dumps, pack_mutation

    manifest_path = folder / MANIFEST_NAME
    original_manifest = manifest_path.read_bytes()
    doc = json.loads(original_manifest)
    record = next(a for a in doc["adapters"] if not a["fused"])
    name, pack = record["name"], folder / record["pack"]
    original = pack.read_bytes()
    tally = Tally(PACK_READERS)
    for i in range(n):
        mutation = pack_mutation(original, random.Random(f"{seed}:pack:{i}"))
        pack.write_bytes(mutation.data)
        if "pack_sha256" in record:  # a pack rewritten with its manifest, so the reader goes past the hash
            changed = copy.deepcopy(doc)
            _pack_record(changed, record["pack"])["pack_sha256"] = hashlib.sha256(mutation.data).hexdigest()
            manifest_path.write_bytes(dumps(changed))
        try:
            tally.add("AdapterBank.pack", *_call(lambda: AdapterBank(folder, read_manifest(folder)).pack(name)),
                      mutation)
            tally.add("AdapterBank.weights_for",
                      *_call(lambda: AdapterBank(folder, read_manifest(folder)).weights_for({}, {name: 0.8})), mutation)
            tally.add("Pipeline.load", *_call(lambda: _load_within(folder, work)), mutation)
            tally.add("Pipeline.set_adapters",
                      *_call(lambda: _load_within(folder, work, adapters={name: 0.0}).set_adapters({name: 0.5})),
                      mutation)
        finally:
            pack.write_bytes(original)
            manifest_path.write_bytes(original_manifest)
    return tally


def lora_section(model: dict, folder: Path, work: Path, n: int, seed: int) -> Tally:
    from lcmrt.export.build import library_output_silenced
    from lcmrt.export.loading import load_model
    from lcmrt.export.lora import LoraSpec, fuse_loras, group_modules, read_lora_file
    from tests.fuzz.mutations import lora_mutation

    def read(path):
        sd, metadata = read_lora_file(path)
        group_modules(path, sd, metadata)

    tally = Tally(LORA_READERS)
    # diffusers and peft print and log what they cannot load; the tally has it
    logging.disable(logging.CRITICAL)
    with library_output_silenced(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        base = load_model(str(model["model"])).pipe
        sources = [(Path(model[key]).read_bytes(), role) for key, role in LORA_FILES.values()]
        for i in range(n):
            original, role = sources[i % len(sources)]
            mutation = lora_mutation(original, random.Random(f"{seed}:lora:{i}"))
            path = work / "lora" / f"fuzz-{i}.safetensors"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(mutation.data)
            target = work / "adapter-add"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(folder, target)
            spec = LoraSpec(path, weight=0.8, name=role, role=role)
            tally.add("read_lora_file + group_modules", *_call(lambda: read(path)), mutation)
            tally.add("lcmrt adapter add", *_cli(["adapter", "add", target, path, "--name", f"fuzz{i}"]), mutation)
            tally.add("fuse_loras", *_call(lambda: fuse_loras(copy.deepcopy(base), [spec])), mutation)
            path.unlink()
    logging.disable(logging.NOTSET)
    return tally


def _counts_line(counts: Counter) -> str:
    from lcmrt import errors

    ours = {name for name, cls in vars(errors).items() if isinstance(cls, type) and issubclass(cls, errors.LcmrtError)}
    fine = sorted((k for k in counts if k in ours | {"ok", "UsageError"}), key=lambda k: (k != "ok", -counts[k], k))
    bad = sorted((k for k in counts if k not in fine), key=lambda k: (-counts[k], k))
    line = ", ".join(f"{k} {counts[k]}" for k in fine)
    if bad:
        line += f"; escaped: {', '.join(f'{k} {counts[k]}' for k in bad)}"
    return line


def print_report(sections: dict[str, tuple[str, Tally]]) -> None:
    width = max(len(r) for _, t in sections.values() for r in t.counts)
    for title, tally in sections.values():
        print(title)
        for reader, counts in tally.counts.items():
            print(f"  {reader:<{width}}  {_counts_line(counts)}")
        print()
    escapes = [(section, *key, m) for section, (_, t) in sections.items() for key, m in sorted(t.escapes.items())]
    print(f"escapes (not an lcmrt error): {len(escapes)} distinct by reader, exception and place; the shortest "
          "mutation of each")
    for section, reader, label, where, mutation in escapes:
        print(f"  {section:<8}  {reader:<{width}}  {label:<28}  {where:<32}  {mutation}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300, help="Mutations of each kind (manifest, pack, LoRA).")
    parser.add_argument("--seed", type=int, default=0, help="Same seed, same mutations.")
    parser.add_argument("--workdir", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the counts and escapes here.")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lcmrt-fuzz-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # the runtime's cache of verified files goes to a throwaway folder, not ~/.cache (read at import), and not
    # into the scratch folder, where every file the readers open outside the engine folder is an escape
    os.environ.setdefault("LCMRT_CACHE_DIR", tempfile.mkdtemp(prefix="lcmrt-fuzz-cache-"))
    warnings.simplefilter("ignore")  # readers warn about what they are given; the counts are the report

    from lcmrt.export.random_model import write_random_model
    from tests.tiny_engines import build_tiny_engine

    start = time.perf_counter()
    model = write_random_model(work / "model", size="tiny", seed=0, overwrite=True)
    pristine = work / "tiny-refit"
    if not pristine.exists():
        build_tiny_engine(model, pristine, refittable=True)
    folder = work / "engine"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(pristine, folder)
    n = args.examples
    print(f"tiny refittable engine folder ready in {time.perf_counter() - start:.0f} s; {n} mutations of each "
          f"kind, seed {args.seed}\n", flush=True)
    sections = {}
    for section, title, run in (
            ("manifest", f"manifest.json mutations ({n})", lambda: manifest_section(folder, work, n, args.seed)),
            ("pack", f"adapter pack mutations ({n}, adapters/style.safetensors)",
             lambda: pack_section(folder, work, n, args.seed)),
            ("lora", f"LoRA file mutations ({n}: {', '.join(LORA_FILES)} alternately)",
             lambda: lora_section(model, folder, work, n, args.seed))):
        section_start = time.perf_counter()
        sections[section] = (title, run())
        print(f"{section}: {time.perf_counter() - section_start:.0f} s", flush=True)
    print()
    print_report(sections)
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "examples": n, "seed": args.seed,
            "counts": {s: {r: dict(c) for r, c in t.counts.items()} for s, (_, t) in sections.items()},
            "escapes": [{"section": s, "reader": r, "exception": label, "raised_at": where, "mutation": m}
                        for s, (_, t) in sections.items() for (r, label, where), m in sorted(t.escapes.items())],
        }, indent=1))


if __name__ == "__main__":
    main()
