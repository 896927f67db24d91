"""Contract violations of the GPU stand-in: raised where they happen and also recorded, so that a violation
the code under test swallows (e.g. an `except Exception` around CUDA-graph capture) still fails the test.

Each rule cites where it comes from: TensorRT's, CuPy's and ONNX Runtime's documentation."""
from __future__ import annotations

import contextlib
import re

violations: list[str] = []


class ContractViolation(AssertionError):
    """The code under test used the TensorRT / CuPy / ONNX Runtime CUDA API in a way the real one forbids."""


def violate(message: str) -> ContractViolation:
    """Record `message` and return the exception to raise (callers that must return False instead just call)."""
    violations.append(message)
    return ContractViolation(message)


def reset() -> None:
    violations.clear()


@contextlib.contextmanager
def expect(pattern: str):
    """Inside: the code must violate a contract matching `pattern` (regex) at least once; those records are
    consumed, so the fixture's end-of-test check only sees unexpected ones."""
    start = len(violations)
    try:
        yield
    except ContractViolation as e:
        if not re.search(pattern, str(e)):
            raise
    new = violations[start:]
    del violations[start:]
    unexpected = [v for v in new if not re.search(pattern, v)]
    assert new, f"expected a contract violation matching {pattern!r}, got none"
    assert not unexpected, f"unexpected contract violations: {unexpected}"
