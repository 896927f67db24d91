"""What every endpoint of one server reads: its models, queue, metrics and default model."""
from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from ..errors import InputError
from ..pipeline import Pipeline
from .metrics import ServerMetrics
from .scheduler import Scheduler


@dataclass
class ServerState:
    pipelines: dict[str, Pipeline]  # model name (its folder's name) -> pipeline
    scheduler: Scheduler
    metrics: ServerMetrics
    default_model: str  # what requests that name no model use (A1111's option sd_model_checkpoint)

    def model(self, name: str | None) -> tuple[str, Pipeline]:
        """The model called `name` (None: the default one)."""
        name = self.default_model if name is None else name
        if not isinstance(name, str) or name not in self.pipelines:
            raise InputError(f"Model {name!r} is not served here; the models are {', '.join(self.pipelines)} (each "
                             "named after its engine folder). Start the server with that folder to serve it.")
        return name, self.pipelines[name]


def server_state(request: Request) -> ServerState:
    """The endpoints' dependency on their app's state."""
    return request.app.state.lcmrt
