"""`lcmrt serve`: engine folders behind an HTTP API (the AUTOMATIC1111 web UI subset and lcmrt's own), with a
bounded job queue and Prometheus metrics. The only part of lcmrt that imports the ASGI stack (the `serve` extra)."""
from .app import create_app
from .launch import load_pipelines, serve

__all__ = ["create_app", "load_pipelines", "serve"]
