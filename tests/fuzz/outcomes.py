"""What a reader did with a damaged input, for the fuzz tests (tests/fuzz) and `python -m benchmarks.fuzz_report`.

The contract: a reader returns a result or raises one of lcmrt's own errors (`lcmrt.errors.LcmrtError`; the
CLI prints them as `error: ...` with exit code 2), within a time limit, and never opens a file outside the
engine folder it was given. Anything else is a bug, named by its exception and the place it was raised.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

PROJECT_DIRS = ("lcmrt", "export", "engines")


def raised_at(error: BaseException) -> str:
    """`file:line` where an exception was raised, in the project's code where the traceback passes through it
    (the innermost such frame), else the innermost frame."""
    if isinstance(error, ReadOutside):
        return f"opened {error}"
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "?"
    root = Path(__file__).resolve().parents[2]
    ours = [f for f in frames if _relative(f.filename, root).split("/")[0] in PROJECT_DIRS]
    frame = (ours or frames)[-1]
    return f"{_relative(frame.filename, root)}:{frame.lineno}"


def _relative(filename: str, root: Path) -> str:
    path = Path(filename).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else "/".join(path.parts[-3:])


def error_name(error: BaseException) -> str:
    """An exception's type: bare for Python's and lcmrt's own, with its module for a library's (`re.error`)."""
    cls = type(error)
    if cls.__module__ in ("builtins", "lcmrt.errors"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def outcome(call) -> tuple[str, BaseException | None]:
    """("ok", None) if `call()` returns, else (the exception's type name, the exception). KeyboardInterrupt passes."""
    try:
        call()
    except Exception as e:  # the report counts every kind; the tests re-raise what is not an LcmrtError
        return error_name(e), e
    return "ok", None


def cli_outcome(result) -> tuple[str, BaseException | None]:
    """What a `CliRunner.invoke` came to: "ok", an LcmrtError printed as `error: ...` with exit code 2 (its type
    name), "UsageError" (click's exit code 2), or the exception that escaped the command."""
    from lcmrt.errors import LcmrtError

    error = result.exception
    if error is None:
        return ("ok", None) if result.exit_code == 0 else (f"exit {result.exit_code}", None)
    if isinstance(error, SystemExit):
        cause = error.__context__  # the CLI exits from inside its `except LcmrtError`; click from its UsageError
        if isinstance(cause, LcmrtError):
            # a line "error: ..." (a build's progress lines may come before it)
            if result.exit_code != 2 or "\nerror: " not in "\n" + result.stderr:
                return f"{error_name(cause)} printed wrongly (exit {result.exit_code})", cause
            return error_name(cause), cause
        if result.exit_code == 2:
            return "UsageError", cause
        return f"exit {result.exit_code}", cause
    return error_name(error), error


def accepted(label: str, error: BaseException | None) -> bool:
    from lcmrt.errors import LcmrtError

    if label == "TimeLimit":  # an lcmrt error that wraps the time limit's exception is still a hang
        return False
    return label in ("ok", "UsageError") or (isinstance(error, LcmrtError) and "wrongly" not in label)


def raise_unless_accepted(label: str, error: BaseException | None, what: str) -> None:
    """For the tests: re-raise an error that is not lcmrt's with its own traceback (hypothesis tells bugs apart by
    where they were raised), or fail on an outcome that is neither a result nor an lcmrt error."""
    if accepted(label, error):
        return
    if error is not None and not isinstance(error, SystemExit):
        raise error
    raise AssertionError(f"{what}: {label}")


# --- time limits --------------------------------------------------------------------------------------------
class TimeLimit(Exception):
    """A reader ran past its time limit (raised inside it, so its traceback shows where it was)."""


class Timer:
    expired = False


@contextmanager
def time_limit(seconds: float):
    """Raise TimeLimit in the main thread after `seconds` (SIGALRM; Python code only: a call into a native
    library is interrupted when it returns). Yields a Timer whose `expired` tells afterwards whether the limit
    was reached, also when the reader caught the TimeLimit and raised its own error instead."""
    timer = Timer()

    def expire(signum, frame):
        timer.expired = True
        raise TimeLimit(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield timer
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- files opened outside the engine folder -----------------------------------------------------------------
_recording: list | None = None  # paths opened while an OpenedFiles is active
_hooked = False


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _recording is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _recording.append(os.path.realpath(os.fsdecode(args[0])))


class OpenedFiles:
    """The files Python code opens inside the `with` block (builtins.open, os.open, np.memmap; audit event
    "open"), resolved through links. Native libraries (ONNX Runtime, tokenizers, safetensors) open files
    without it, so a test pairs this with a name a Python reader would hash or map first."""

    def __enter__(self) -> list[str]:
        global _recording, _hooked
        if not _hooked:
            sys.addaudithook(_audit)  # cannot be removed: it records only while a block is active
            _hooked = True
        _recording = self.paths = []
        return self.paths

    def __exit__(self, *exc) -> None:
        global _recording
        _recording = None


SENSITIVE = ("/etc/passwd", "/etc/hostname")


class ReadOutside(Exception):
    """A reader opened a file outside the engine folder (the message names it)."""


def escaped(opened: list[str], folder: Path, watched: Path) -> list[str]:
    """Opened files that lie outside `folder`, either under `watched` (where a test keeps its bait files) or
    among the system files the mutations name."""
    folder, watched = Path(os.path.realpath(folder)), Path(os.path.realpath(watched))
    return sorted({p for p in opened if not Path(p).is_relative_to(folder)
                   and (Path(p).is_relative_to(watched) or p in SENSITIVE)})
