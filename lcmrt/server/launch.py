"""Load the engine folders and run the app with uvicorn: what `lcmrt serve` calls."""
from __future__ import annotations

import os
from pathlib import Path

import uvicorn

from ..errors import InputError
from ..pipeline import Pipeline
from .app import create_app


def model_names(folders: list[str | Path]) -> dict[str, Path]:
    """{model name: folder}: each model is named after its folder, so the names must differ."""
    names: dict[str, Path] = {}
    for folder in map(Path, folders):
        name = Path(os.path.abspath(folder)).name  # "engine/." is "engine"; a symlink keeps its own name
        if name in names:
            raise InputError(f"Two engine folders are named {name!r} ({names[name]} and {folder}); each model is "
                             "named after its folder, so rename or symlink one under another name.")
        names[name] = folder
    return names


def load_pipelines(folders: list[str | Path], backend: str = "auto") -> dict[str, Pipeline]:
    """Each folder loaded once, under its model name; the names are checked before any folder loads."""
    return {name: Pipeline.load(folder, backend=backend) for name, folder in model_names(folders).items()}


def serve(folders: list[str | Path], host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None,
          queue_size: int = 16, timeout: float = 300.0, backend: str = "auto") -> None:
    """Serve `folders` until interrupted (Ctrl-C or SIGTERM)."""
    app = create_app(load_pipelines(folders, backend), queue_size=queue_size, timeout=timeout, api_key=api_key)
    uvicorn.run(app, host=host, port=port)
