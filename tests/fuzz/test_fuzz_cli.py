"""Random argument lists for the `lcmrt` commands (lcmrt/cli.py): `generate`, `info`, `adapter add`, `adapter
list`, `bench` and `build`, with option values that are negative, huge, not numbers, bad or missing paths,
non-UTF-8 (surrogate escapes, as Python decodes such bytes from argv) or unknown options. Each run ends with
exit code 0, a usage error (exit code 2), or an LcmrtError printed as `error: ...` (exit code 2); a traceback
fails, and so does a command still running after its time limit.

Arguments name paths by placeholders (`<refit>`, `<file>`, `<scratch>/x.png`), replaced per example with paths
in a fresh scratch folder, which is also the working directory: nothing is written outside it. `build` runs
its checks and loads the model, but stops where it would fuse LoRAs or build engines (seconds of work each).
"""
from __future__ import annotations

import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz.outcomes import cli_outcome, raise_unless_accepted, time_limit
from lcmrt.cli import cli

EXAMPLES = settings().max_examples  # the profile's (100 under "ci")
TIME_LIMIT_S = 10  # the slowest valid request here (50 steps with guidance, 2 images, tiny folder) takes ~3 s

TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", "a fox", "\udcff", "caf\udce9", "é中🦊", "\x00", "-",
                                                        "--x", "x" * 2000]))
ODD_NUMBERS = ["0", "-1", "1.5", "1e3", "abc", "", "nan", " 3", "0x10", "99999999999999999999"]
ODD_FLOATS = ["-1", "nan", "inf", "-inf", "1e400", "abc", ""]
OUTPUTS = ["<scratch>/out.png", "<scratch>/sub/dir/x.png", "x.png"]
ODD_OUTPUTS = ["<scratch>/x.jpg", "<scratch>/noext", "<scratch>", "<file>/x.png", "", "<scratch>/\udcff.png", "<dir>/"]
BACKENDS = ["auto", "onnxruntime", "onnxruntime-cpu"]
ODD_BACKENDS = ["onnxruntime-cuda", "onnxruntime-trt", "tensorrt", "", "nope"]
JUNK = st.sampled_from(["--nope", "-z", "--", "-", "", "\udcff", "--help"])


def mostly(usual: list[str], odd: list[str]):
    """One of `usual` three times in four, else one of `odd`: most runs get past the parser to real work."""
    return st.sampled_from(usual * (3 * len(odd) // len(usual) + 1) + odd)


FOLDERS = mostly(["<refit>", "<plain>"], ["<missing>", "<file>", "<dir>", "<scratch>", "", "/", "\udcff"])


@st.composite
def command(draw, words: tuple, positionals: tuple, options: dict, usual: dict | None = None,
            always: dict | None = None):
    """`words` (the command), then each positional (rarely left out), some `options` (a strategy for the value,
    None for a flag; `usual` ones are present most of the time, `always` ones always), and a stray token now and
    then."""
    args = (["--debug"] if draw(st.integers(0, 9)) == 0 else []) + list(words)
    start = len(args)
    args += [draw(p) for p in positionals if draw(st.integers(0, 15)) > 0]
    chosen = sorted(always or {}) + [name for name in sorted(usual or {}) if draw(st.integers(0, 7)) > 0]
    if options:
        chosen += draw(st.lists(st.sampled_from(sorted(options)), unique=True, max_size=4))
    everything = {**options, **(usual or {}), **(always or {})}
    for name in chosen:
        args += [name] if everything[name] is None else [name, draw(everything[name])]
    if draw(st.integers(0, 5)) == 0:
        args.insert(draw(st.integers(start, len(args))), draw(JUNK))
    return args


GENERATE = command(("generate",), (FOLDERS, TEXT), {
    "--negative-prompt": TEXT, "--steps": mostly(["1", "2", "4", "8", "50"], ["51"] + ODD_NUMBERS),
    "--guidance": mostly(["1", "1.5", "8", "0"], ODD_FLOATS),
    "--seed": mostly(["0", "42", "4294967296", "18446744073709551617"], ["-1", "abc", "1.5"]),
    "--num-images": mostly(["1", "2"], ["0", "-1", "abc", "1.5"]), "--backend": mostly(BACKENDS, ODD_BACKENDS),
    "--precision": mostly(["fp32"], ["fp16", "int8", "bf16", ""]),
    "--adapter": mostly(["style:0.5", "style", "lcm:1", "style:-1"],
                        ["nope:1", "style:nan", "style:1e400", ":", "", "lcm:0.5", "a:b:c", "style:"]),
}, usual={"-o": mostly(OUTPUTS, ODD_OUTPUTS)})
INFO = command(("info",), (FOLDERS,), {"--json": None})
ADAPTER_LIST = command(("adapter", "list"), (FOLDERS,), {})
ADAPTER_ADD = command(("adapter", "add"), (
    mostly(["<copy>"], ["<plain-copy>", "<missing>", "<file>", "", "\udcff"]),
    mostly(["<style>", "<lcm>"], ["<missing>", "<file>", "<dir>", "<pickle>", "", "\udcff"])),
    {"--name": mostly(["fresh", "x.y-z_1"], ["style", "lcm", "../x", "../../escaped", "a/b", ".", "", "\udcff",
                                             "é中🦊", "x" * 300]),
     "--allow-pickle": None})
BENCH = command(("bench",), (FOLDERS,), {
    "--steps": mostly(["1", "2", "4"], ["0", "-1", "51", "abc"]), "--guidance": mostly(["1", "1.5"], ODD_FLOATS),
    "--repeats": mostly(["1", "2"], ["0", "-1", "abc"]), "--backend": mostly(BACKENDS, ODD_BACKENDS),
    "--prompt": TEXT,
    "--json": mostly(["<scratch>/bench.json"], ["<scratch>", "<file>/x.json", ""]),
    # the default 4096^3 GEMM takes seconds, and a huge one the machine's memory: always a small size
}, always={"--gemm-size": mostly(["16", "64"], ["1", "0", "-1", "abc", "1.5"])})
LORA_ARGS = mostly(["<style>", "<style>:0.8", "style=<style>:0.8"],
                   ["<style>:abc", "<style>:nan", "<style>:inf", ":", "=", "", "a=:1", "<missing>:1", "x=<lcm>",
                    "<lcm>"])
BUILD = command(("build",), (mostly(["<model>"], ["<missing>", "<file>", "<dir>", "<pickle>", "org/name", "a/b/c", "",
                                                  "\udcff", "<style>"]),), {
    "--lcm-weight": mostly(["1", "0.5"], ODD_FLOATS), "--lora": LORA_ARGS,
    "--height": mostly(["64", "128"], ["60"] + ODD_NUMBERS), "--width": mostly(["64", "128"], ["60"] + ODD_NUMBERS),
    "--batch": mostly(["1", "2"], ODD_NUMBERS), "--guidance-mode": mostly(["none", "cfg"], ["x", ""]),
    "--config": st.sampled_from(["<model>", "<missing>", "<file>", ""]),
    "--allow-pickle": None, "--overwrite": None, "--refittable": None, "--refittable-lcm": None,
    "--ort-cpu-graphs": None, "--no-ort-cpu-graphs": None,
    "--backend": mostly(["onnxruntime"], ["tensorrt", "x"]),
    "--engines-only": mostly(["<plain-copy>", "<copy>"], ["<missing>", "<file>", "<dir>"]),
    "--fp16": None, "--no-fp16": None, "--fp16-vae": None, "--int8": None,
    "--vae-decoder": st.sampled_from(["<missing>", "<file>", "<dir>", "<model>"]),
    "--workspace": mostly(["2G", "1G"], ["0", "-1", "abc", "", "1e30"]), "--quiet": None,
}, usual={"--lcm-lora": mostly(["<lcm>"], ["<style>", "<missing>", "<file>", "<dir>", "", "<pickle>"]),
          "--out": mostly(["<scratch>/engine"], ["<copy>", "<file>", "<dir>", "<scratch>", ""])})


class BuildStarted(Exception):
    """`lcmrt build` got past its checks to real work (fusing LoRAs, building engines): an accepted outcome."""


def _stop(*args, **kwargs):
    raise BuildStarted()


@pytest.fixture
def run(tiny_model, tiny_engine, tiny_refit_engine, tmp_path):
    """run(args): the CLI on `args` with placeholders replaced, in a fresh scratch folder; fails unless the run
    ended as accepted within the time limit."""
    def run_cli(args: list[str], limit: float = TIME_LIMIT_S, accept=(), writes_outputs: bool = True):
        scratch = Path(tempfile.mkdtemp(dir=tmp_path))
        (scratch / "file.txt").write_text("not a model\n")
        (scratch / "dir").mkdir()
        (scratch / "lora.ckpt").write_bytes(b"not a pickle")
        places = {"<refit>": tiny_refit_engine, "<plain>": tiny_engine, "<model>": tiny_model["model"],
                  "<style>": tiny_model["style_lora"], "<lcm>": tiny_model["lcm_lora"],
                  "<missing>": scratch / "missing", "<file>": scratch / "file.txt", "<dir>": scratch / "dir",
                  "<pickle>": scratch / "lora.ckpt", "<copy>": scratch / "copy", "<plain-copy>": scratch / "plain-copy",
                  "<scratch>": scratch}
        if any("<copy>" in a for a in args):
            shutil.copytree(tiny_refit_engine, scratch / "copy")
        if any("<plain-copy>" in a for a in args):
            shutil.copytree(tiny_engine, scratch / "plain-copy")
        for placeholder, path in places.items():
            args = [a.replace(placeholder, str(path)) for a in args]
        # adapter add writes into its folder only; the other commands also write outputs into the scratch folder
        unchanged = scratch / "copy" if not writes_outputs else scratch
        before = _files_outside(tmp_path, unchanged)
        sigterm = signal.getsignal(signal.SIGTERM)  # `lcmrt build` makes SIGTERM a KeyboardInterrupt
        runner = CliRunner()
        try:
            with runner.isolated_filesystem(temp_dir=scratch), time_limit(limit) as timer:
                result = runner.invoke(cli, args)
        finally:
            signal.signal(signal.SIGTERM, sigterm)
        assert not timer.expired, f"lcmrt {args} was still running after {limit} s: {result.output[-2000:]}"
        if not isinstance(result.exception, accept):
            raise_unless_accepted(*cli_outcome(result), f"lcmrt {args}: {result.output[-2000:]}")
        written = _files_outside(tmp_path, unchanged) - before
        assert not written, f"lcmrt {args} wrote {sorted(written)} outside {unchanged}"
        shutil.rmtree(scratch)
        return result

    return run_cli


def _files_outside(root: Path, inside: Path) -> set[str]:
    """Files under `root` but not under `inside`."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.is_relative_to(inside)}


@settings(max_examples=max(8, EXAMPLES // 4))
@given(args=GENERATE)
def test_generate(run, args):
    run(args)


@pytest.mark.parametrize("num_images", ["10000", "1000000000"])
def test_generate_refuses_huge_num_images_fast(run, num_images):
    """A request for more images than the runtime can make in reasonable time fails before generating."""
    run(["generate", "<refit>", "a fox", "--num-images", num_images, "-o", "<scratch>/fox.png"], limit=TIME_LIMIT_S)


@settings(max_examples=EXAMPLES // 2)
@given(args=st.one_of(INFO, ADAPTER_LIST))
def test_info_and_adapter_list(run, args):
    run(args)


@settings(max_examples=max(8, EXAMPLES // 8))
@given(args=ADAPTER_ADD)
def test_adapter_add(run, args):
    run(args, writes_outputs=False)


@settings(max_examples=max(5, EXAMPLES // 10))
@given(args=BENCH)
def test_bench(run, args):
    run(args)


@settings(max_examples=max(8, EXAMPLES // 5))
@given(args=BUILD)
def test_build(run, monkeypatch, args):
    import lcmrt.engines.build
    import lcmrt.export.lora

    check_engines = lcmrt.engines.build.check_engine_request

    def check_then_stop(*check_args, **check_kwargs):
        check_engines(*check_args, **check_kwargs)
        raise BuildStarted()

    monkeypatch.setattr(lcmrt.export.lora, "fuse_loras", _stop)  # lcmrt build: past the checks and the model load
    # --engines-only: past reading the folder and checking the request
    monkeypatch.setattr(lcmrt.engines.build, "check_engine_request", check_then_stop)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id fails at once instead of trying the network
    run(args, accept=BuildStarted)
