"""The service as a user runs it (`python -m qwen3vl_backend.launch`), and what happens when
parts of it die or it is told to stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from qwen3vl_backend.supervisor import STUB, children, free_ports, shm_files

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


class Launch:
    def __init__(self, tiny_moe, root: Path, *extra: str):
        self.port, self.grpc, self.http, self.metrics = free_ports(4)
        self.out, self.err = open(root / "launch.out", "w+"), open(root / "launch.err", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwen3vl_backend.launch", "--model-path", str(tiny_moe), "--device", "cpu",
             "--port", str(self.port), "--grpc-port", str(self.grpc), "--triton-http-port", str(self.http),
             "--metrics-port", str(self.metrics), "--repository", str(root / "repo"), "--context-length", "1024",
             "--preprocess-instances", "1", "--enable-metrics", *extra],
            stdout=self.out, stderr=self.err, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_banner(self, timeout_s: float = 300) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = Path(self.out.name).read_text()
            if "Ctrl-C stops both" in text:
                return text
            assert self.proc.poll() is None, Path(self.err.name).read_text()[-3000:]
            time.sleep(0.3)
        raise TimeoutError(Path(self.err.name).read_text()[-3000:])

    def triton_pid(self) -> int:
        [pid] = children(self.proc.pid, "tritonserver")
        return pid

    def stub(self, model: str) -> int:
        for pid in children(self.triton_pid(), STUB):
            if f"/{model}/1/model.py" in Path(f"/proc/{pid}/cmdline").read_text():
                return pid
        raise LookupError(model)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def _chat(url: str, timeout: float = 60, **extra) -> httpx.Response:
    body = {"model": "tiny-moe", "messages": [{"role": "user", "content": "Hello?"}], "temperature": 0,
            "max_tokens": 8, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


@pytest.fixture
def launched(tiny_moe, tmp_path):
    launch = Launch(tiny_moe, tmp_path)
    launch.wait_banner()
    yield launch
    launch.close()


def test_banner_names_every_port_and_triton_listens_on_loopback_only(launched):
    text = Path(launched.out.name).read_text()
    assert f"metrics: http://127.0.0.1:{launched.metrics}/metrics" in text
    assert f"Triton gRPC:  127.0.0.1:{launched.grpc}" in text
    listening = [line.split() for table in ("tcp", "tcp6")
                 for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]]
    bound = {int(f[1].split(":")[1], 16): f[1].split(":")[0] for f in listening if f[3] == "0A"}    # LISTEN
    loopback = ("0100007F", "0000000000000000FFFF00000100007F")            # 127.0.0.1, also IPv4-mapped
    for port in (launched.port, launched.grpc, launched.http, launched.metrics):
        assert bound.get(port) in loopback, (port, bound.get(port))      # not 0.0.0.0 or ::


def test_a_killed_model_process_is_noticed_reported_and_replaced(launched):
    triton = launched.triton_pid()
    regions = shm_files([triton, *children(triton, STUB)])
    assert regions, "Triton's Python models map shared memory under /dev/shm"
    events, ended = [], {}

    def stream():
        body = {"model": "tiny-moe", "messages": [{"role": "user", "content": "Talk."}], "stream": True,
                "max_tokens": 900, "ignore_eos": True, "temperature": 0}
        with httpx.Client(timeout=120) as h, h.stream("POST", f"{launched.url}/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        ended["at"] = time.monotonic()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    while len(events) < 5:
        assert t.is_alive()
        time.sleep(0.05)
    os.kill(launched.stub("llm"), signal.SIGKILL)
    killed = time.monotonic()

    red = {}
    while time.monotonic() - killed < 10 and len(red) < 2:
        for name, url in (("adapter", f"{launched.url}/health"),
                          ("triton", f"http://127.0.0.1:{launched.http}/v2/health/ready")):
            if name not in red and _status(url) != 200:
                red[name] = time.monotonic() - killed
        time.sleep(0.1)
    assert set(red) == {"adapter", "triton"} and max(red.values()) <= 5.0, red

    t.join(10)
    assert "at" in ended and ended["at"] - killed <= 5.0
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2]), events[-3:]

    while time.monotonic() - killed < 60:
        if _status(f"{launched.url}/health") == 200:
            break
        time.sleep(0.5)
    r = _chat(launched.url)
    assert r.status_code == 200, r.text
    assert time.monotonic() - killed <= 60
    assert "restarting tritonserver" in Path(launched.err.name).read_text()

    triton = launched.triton_pid()
    regions |= shm_files([triton, *children(triton, STUB)])
    pids = [launched.proc.pid, triton, *children(launched.proc.pid)]
    launched.proc.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    launched.proc.wait(15)
    assert time.monotonic() - stopped <= 10.0
    time.sleep(0.5)
    assert not [p for p in pids if _alive(p)]
    assert not [f for f in regions if os.path.exists(f)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_starting_stops_everything(tiny_moe, tmp_path, sig):
    launch = Launch(tiny_moe, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not children(launch.proc.pid, "tritonserver"):
            time.sleep(0.1)
        time.sleep(3)                                  # its models are loading now
        kids = children(launch.proc.pid)
        assert kids
        grandkids = [g for k in kids for g in children(k)]
        regions = shm_files(kids + grandkids)
        launch.proc.send_signal(sig)
        start = time.monotonic()
        assert launch.proc.wait(15) == 0
        assert time.monotonic() - start <= 10.0
        time.sleep(0.5)
        assert not [p for p in kids + grandkids if _alive(p)]
        assert not [f for f in regions if os.path.exists(f)]
    finally:
        launch.close()


def test_non_streaming_request_is_cancelled_when_its_client_leaves(launched):
    def cancelled():
        text = httpx.get(f"http://127.0.0.1:{launched.metrics}/metrics", timeout=10).text
        line = [x for x in text.splitlines() if x.startswith("qwen3vl_requests_cancelled_total")]
        return float(line[0].rsplit(" ", 1)[1]) if line else 0.0

    before = cancelled()
    with pytest.raises(httpx.TimeoutException):
        _chat(launched.url, max_tokens=900, ignore_eos=True, timeout=2.0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and cancelled() == before:
        time.sleep(0.2)
    assert cancelled() == before + 1
