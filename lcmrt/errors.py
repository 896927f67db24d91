"""Every error lcmrt raises on purpose. Messages say what was wrong, where, and what to do about it."""


class LcmrtError(Exception):
    """Base class: the CLI prints these as one paragraph instead of a traceback."""


class InputError(LcmrtError):
    """A path, option or argument the user gave is missing or invalid."""


class ModelLoadError(LcmrtError):
    """The base model could not be found or loaded."""


class LoraError(LcmrtError):
    """A LoRA file could not be read, matched to the model, or fused exactly."""


class ExportError(LcmrtError):
    """A component failed to export to ONNX or did not match torch within tolerance."""


class EngineFolderError(LcmrtError):
    """An engine folder is missing, incomplete, from a newer format, or was modified after the build."""


class GenerationError(LcmrtError):
    """A generation request does not fit the engine folder (steps, guidance, shapes)."""


class AdapterError(LcmrtError):
    """An adapter cannot be added, found, or applied to an engine folder."""


class BackendError(LcmrtError):
    """A backend is not installed, not supported on this machine, or failed to run a component."""
