"""Timed stages with a live spinner: the build and generate commands show progress through this."""
from __future__ import annotations

import time
from contextlib import contextmanager


class Stages:
    """Records seconds per stage; with a rich console, shows a spinner while a stage runs."""

    def __init__(self, console=None):
        self.console = console
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        if self.console is None:
            yield
        else:
            with self.console.status(f"{name} ..."):
                yield
        self.seconds[name] = time.perf_counter() - start
        if self.console is not None:
            self.console.print(f"[green]done[/green] {name} [dim]({self.seconds[name]:.1f} s)[/dim]")
