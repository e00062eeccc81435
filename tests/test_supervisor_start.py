"""Server.wait_ready when tritonserver dies while loading: a death by a signal (Triton 2.51 once
aborted so in CI) starts it again, an exit with a status (a model that cannot load) does not.
Stand-ins, no Triton: the processes are Python one-liners and an HTTP server whose files are the
health paths that answer 200."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3vl_backend.supervisor import Server, free_port, free_ports

KILLED = "import os, signal; os.kill(os.getpid(), signal.SIGABRT)"
EXITS = "import sys; sys.exit(1)"


def _http(root: Path, *paths: str) -> list[str]:
    """A command serving `root`, where each of `paths` is a file (a GET of it answers 200), on a free port."""
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_text("ok")
    return [sys.executable, "-m", "http.server", str(free_port()), "--bind", "127.0.0.1", "--directory", str(root)]


def _server(tmp_path: Path, first: str, later: list[str]) -> Server:
    """A Server whose Triton is `first` (a one-liner) and, each time it is started again, `later`."""
    srv = object.__new__(Server)
    srv.host, srv.log_dir = "127.0.0.1", tmp_path
    srv.triton_log = open(tmp_path / "tritonserver.log", "a")
    srv.frontend_log = open(tmp_path / "frontend.log", "w")
    srv._env, srv._triton_cmd = None, later
    srv.restarts, srv._stubs, srv._shm, srv._next_shm_scan = 0, [], set(), 0.0
    srv.triton_http = f"http://127.0.0.1:{later[3]}" if "http.server" in later else "http://127.0.0.1:9"
    front = _http(tmp_path / "frontend", "health")
    srv.port = int(front[3])
    srv.frontend = subprocess.Popen(front, stdout=srv.frontend_log, stderr=subprocess.STDOUT, start_new_session=True)
    srv.triton = subprocess.Popen([sys.executable, "-c", first], start_new_session=True)
    return srv


def _stop(srv: Server) -> None:
    for proc in (srv.triton, srv.frontend):
        proc.kill()
        proc.wait()
    srv.triton_log.close()
    srv.frontend_log.close()


def test_a_triton_killed_while_loading_is_started_again(tmp_path, capsys):
    srv = _server(tmp_path, KILLED, _http(tmp_path / "triton", "v2/health/ready"))
    try:
        srv.wait_ready(timeout_s=30)
        assert srv.restarts == 1 and srv.triton.poll() is None      # the second one serves
        assert f"killed by signal {int(signal.SIGABRT)} while loading" in capsys.readouterr().err
        assert "restarting tritonserver" in (tmp_path / "tritonserver.log").read_text()
    finally:
        _stop(srv)


# killed again after its one restart: reported; an exit with a status (a model that failed to
# load): reported at once, never retried
@pytest.mark.parametrize("first,later,code,restarts", [(KILLED, KILLED, -6, 1), (EXITS, None, 1, 0)])
def test_a_second_death_while_loading_and_a_plain_exit_are_not_retried(tmp_path, first, later, code, restarts):
    later = [sys.executable, "-c", later] if later else _http(tmp_path / "triton", "v2/health/ready")
    srv = _server(tmp_path, first, later)
    try:
        with pytest.raises(RuntimeError, match=f"exited with code {code} "):
            srv.wait_ready(timeout_s=30)
        assert srv.restarts == restarts
    finally:
        _stop(srv)


def _env_with_numpy(root: Path, version: str) -> Path:
    """A stand-in Python environment whose interpreter reports numpy `version` (a shell script)."""
    (root / "bin").mkdir(parents=True)
    python = root / "bin" / "python3"
    python.write_text(f"#!/bin/sh\necho {version}\n")
    python.chmod(0o755)
    return root


def test_the_wheels_stub_refuses_an_environment_with_numpy_2_before_triton_starts(tmp_path, monkeypatch):
    """Triton 2.51's stub (the nvidia-pytriton wheel's) reads string inputs wrong under numpy 2: on
    an H200 host whose Python had numpy 2, the first request with an image crashed the preprocess
    stub and failed with a 500. The server refuses to start instead, and says why; numpy 1 and a
    tritonserver that is not the wheel's start as before."""
    from qwen3vl_backend import supervisor
    from qwen3vl_backend.tools.install_triton import stub_numpy_error

    wheel = {"tritonserver": str(tmp_path / "triton" / "pytriton" / "tritonserver" / "bin" / "tritonserver"),
             "backend_dir": "", "ld_library_path": ""}
    other = {**wheel, "tritonserver": "/opt/tritonserver/bin/tritonserver"}
    numpy2, numpy1 = _env_with_numpy(tmp_path / "np2", "2.1.3"), _env_with_numpy(tmp_path / "np1", "1.26.4")
    assert "numpy 2.1.3" in stub_numpy_error(wheel, str(numpy2)) and "needs numpy < 2" in stub_numpy_error(wheel, str(numpy2))
    assert stub_numpy_error(wheel, str(numpy1)) is None and stub_numpy_error(other, str(numpy2)) is None

    repo = tmp_path / "repo" / "preprocess"
    repo.mkdir(parents=True)
    repo.joinpath("config.pbtxt").write_text(
        f'parameters {{ key: "EXECUTION_ENV_PATH" value: {{ string_value: "{numpy2}" }} }}\n')
    monkeypatch.setattr(supervisor, "install", lambda dest: wheel)
    started = []
    monkeypatch.setattr(supervisor, "sweep_stale_regions", lambda: started.append(True))
    with pytest.raises(SystemExit, match=f"cannot serve: the Python environment {numpy2} has numpy 2.1.3"):
        Server(repo.parent, "127.0.0.1", 1, 2, 3, 4, "m", [], tmp_path / "logs", tmp_path / "triton")
    assert not started


def test_free_ports_are_distinct_and_bindable():
    """A server's four ports come from one free_ports call: never one port twice (a test's Triton
    once got one port for HTTP and gRPC from four free_port calls and refused to start)."""
    import socket

    ports = free_ports(32)
    assert len(set(ports)) == 32
    for port in ports[:4]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
