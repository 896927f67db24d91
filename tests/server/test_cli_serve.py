"""`lcmrt serve` (lcmrt/cli.py, lcmrt/server/launch.py): options to the server, folder names checked first."""
from __future__ import annotations

import shutil

from click.testing import CliRunner

from lcmrt.cli import cli
from lcmrt.server import launch


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_serve_loads_each_folder_once_and_runs_uvicorn(tiny_engine, monkeypatch):
    ran = {}
    monkeypatch.setattr(launch.uvicorn, "run", lambda app, host, port: ran.update(app=app, host=host, port=port))
    result = _invoke("serve", f"{tiny_engine}/.", "--port", 0, "--api-key", "k", "--queue-size", 2,
                     "--timeout", 1.5, "--backend", "onnxruntime")
    assert result.exit_code == 0, result.output
    assert (ran["host"], ran["port"]) == ("127.0.0.1", 0)
    state = ran["app"].state.lcmrt
    assert list(state.pipelines) == ["tiny-cfg"] and state.pipelines["tiny-cfg"].backend == "onnxruntime-cpu"
    assert (state.scheduler.queue_size, state.scheduler.timeout) == (2, 1.5)
    assert "warning" not in result.output


def test_serve_warns_when_open_to_the_network_without_a_key(tiny_engine, monkeypatch):
    monkeypatch.setattr(launch.uvicorn, "run", lambda app, host, port: None)
    result = _invoke("serve", tiny_engine, "--host", "0.0.0.0")
    assert result.exit_code == 0, result.output
    assert "without --api-key" in result.stderr


def test_two_folders_of_one_name_are_refused_before_loading(tiny_engine, tmp_path, monkeypatch):
    copy = tmp_path / tiny_engine.name
    shutil.copytree(tiny_engine, copy)
    def load(*args, **kwargs):
        raise AssertionError("a folder was loaded before the names were checked")

    monkeypatch.setattr(launch.Pipeline, "load", load)
    result = _invoke("serve", tiny_engine, copy)
    assert result.exit_code == 2
    assert "Two engine folders are named 'tiny-cfg'" in result.stderr and "Traceback" not in result.output


def test_serve_options_are_checked(tiny_engine):
    assert "--queue-size" in _invoke("serve", tiny_engine, "--queue-size", 0).output
    assert "--timeout" in _invoke("serve", tiny_engine, "--timeout", 0).output
    assert "Missing argument" in _invoke("serve").output
