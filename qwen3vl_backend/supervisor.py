"""tritonserver and the OpenAI adapter as child processes: started, watched, restarted, stopped.

- Triton's ports bind to `triton_host` (loopback unless the launcher is told otherwise): they
  take raw token ids and are not meant for the internet.
- Every child dies with the launcher (PR_SET_PDEATHSIG), even if the launcher is SIGKILLed.
- `check()` notices a dead tritonserver or a dead Python-backend stub (a model process killed,
  or crashed: Triton 2.51 keeps reporting such a model ready and its requests hang). `restart()`
  then kills Triton's whole process group, removes the shared memory its processes had mapped,
  and starts it again on the same ports; in-flight streams see their connection drop and end.
- `stop()` ends everything within a few seconds: SIGTERM, Triton's exit timeout cut to
  `exit_timeout_s`, SIGKILL after that, and the shared memory regions are removed. Regions a
  Triton killed outright left behind (no process maps them) are swept at start and stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .parallel import NO_MULTICAST
from .tools.install_triton import install, stub_numpy_error

ROOT = Path(__file__).resolve().parent.parent
STUB = "triton_python_b"            # the stub's name as /proc shows it (15 characters)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct ports free on loopback now: each socket is held until all are bound (ports asked
    for one at a time can repeat, the first closed before the next is picked; a test's Triton
    was once given one port for both HTTP and gRPC and refused to start)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the launcher dies, however the launcher dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()
    return rest[0], int(rest[1])


def children(pid: int, name: str | None = None) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is None or stat[1] != pid:
            continue
        if name is not None:
            try:
                if (entry / "comm").read_text().strip() != name:
                    continue
            except OSError:
                continue
        out.append(int(entry.name))
    return out


def shm_files(pids) -> set[str]:
    """The /dev/shm files these processes have mapped (Triton's and its stubs' regions)."""
    out = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
                if path.startswith("/dev/shm/"):
                    out.add(path.removesuffix(" (deleted)"))
        except OSError:
            continue
    return out


def sweep_stale_regions(min_age_s: float = 60.0) -> list[str]:
    """Remove Python-backend shared-memory regions that no live process maps and that are older
    than `min_age_s`: what a Triton killed outright (launcher SIGKILLed, OOM killer) left behind."""
    regions = [p for p in Path("/dev/shm").glob("triton_python_backend_shm_region_*")
               if time.time() - p.stat().st_mtime > min_age_s]
    if not regions:
        return []
    mapped = shm_files(int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit())
    removed = []
    for p in regions:
        if str(p) not in mapped:
            try:
                p.unlink()
                removed.append(str(p))
            except OSError:
                pass
    return removed


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Server:
    """tritonserver + the OpenAI adapter as child processes, stopped together."""

    def __init__(self, repo: Path, host: str, port: int, grpc_port: int, triton_http_port: int, metrics_port: int,
                 served_model_name: str, frontend_args: list[str], log_dir: Path, triton_dest: Path,
                 enable_metrics: bool = True, cuda_pool_mb: int = 0, triton_host: str = "127.0.0.1",
                 exit_timeout_s: int = 5):
        self.repo, self.host, self.port = repo, host, port
        self.grpc_port, self.metrics_port, self.triton_host = grpc_port, metrics_port, triton_host
        self.exit_timeout_s = exit_timeout_s
        layout = install(triton_dest)
        for env in sorted(set(re.findall(r'key: "EXECUTION_ENV_PATH" value: \{ string_value: "([^"$]+)" \}',
                                         "".join(p.read_text() for p in repo.glob("*/config.pbtxt"))))):
            problem = stub_numpy_error(layout, env)
            if problem:
                raise SystemExit(f"cannot serve: {problem}")
        self._env = {**os.environ, **NO_MULTICAST}
        if layout["ld_library_path"]:
            self._env["LD_LIBRARY_PATH"] = layout["ld_library_path"] + ":" + self._env.get("LD_LIBRARY_PATH", "")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.triton_log = open(log_dir / "tritonserver.log", "a")
        self.frontend_log = open(log_dir / "frontend.log", "w")
        cmd = [layout["tritonserver"], "--model-repository", str(repo), "--grpc-port", str(grpc_port),
               "--http-port", str(triton_http_port), "--metrics-port", str(metrics_port), "--log-verbose", "0",
               "--grpc-address", triton_host, "--http-address", triton_host, "--metrics-address", triton_host,
               f"--exit-timeout-secs={exit_timeout_s}", f"--allow-metrics={'true' if enable_metrics else 'false'}"]
        if layout["backend_dir"]:
            cmd += ["--backend-directory", layout["backend_dir"]]
        if cuda_pool_mb:       # room for visual features handed between models as CUDA tensors
            cmd += [f"--cuda-memory-pool-byte-size=0:{cuda_pool_mb * 2**20}"]
        # each Python model's shared-memory region starts at 1 MB and grows 1 MB at a time by
        # default: one image's visual features (tens of MB) then cost ~30 growth steps per hand-off
        cmd += [f"--backend-config=python,shm-default-byte-size={64 * 2**20}",
                f"--backend-config=python,shm-growth-byte-size={64 * 2**20}"]
        cmd += shlex.split(os.environ.get("QWEN3VL_TRITON_ARGS", ""))    # e.g. --trace-config flags
        self._triton_cmd = cmd
        self.triton_http = f"http://127.0.0.1:{triton_http_port}" if triton_host in ("127.0.0.1", "0.0.0.0") \
            else f"http://{triton_host}:{triton_http_port}"
        sweep_stale_regions()
        self.restarts = 0
        self._stubs: list[int] = []
        self._shm: set[str] = set()
        self._next_shm_scan = 0.0
        self.triton = self._start_triton()
        self.frontend = subprocess.Popen(
            [sys.executable, "-m", "openai_frontend", "--host", host, "--port", str(port),
             "--triton-url", f"{'127.0.0.1' if triton_host == '0.0.0.0' else triton_host}:{grpc_port}",
             "--served-model-name", served_model_name,
             *(["--triton-metrics-url", f"{self.triton_http.rsplit(':', 1)[0]}:{metrics_port}/metrics"]
               if enable_metrics else []),
             *frontend_args],
            stdout=self.frontend_log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=self._env,
            start_new_session=True, preexec_fn=_die_with_parent)

    def _start_triton(self) -> subprocess.Popen:
        return subprocess.Popen(self._triton_cmd, stdout=self.triton_log, stderr=subprocess.STDOUT, env=self._env,
                                start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_ready(self, timeout_s: float = 600, crash_retries: int = 1) -> None:
        """Triton ready (its models loaded), then the adapter. A tritonserver killed by a signal
        while it loads is started again, `crash_retries` times: Triton 2.51 once aborted so in this
        project's CI (`boost::interprocess::lock_exception` from a Python-backend stub's shared
        memory) and loaded cleanly when started again. An exit with a status (a model that fails
        to load: a wrong path, a bad config) and a time-out are not retried: they would fail again."""
        while True:
            try:
                wait_http(f"{self.triton_http}/v2/health/ready", timeout_s, self.triton)
                break
            except RuntimeError:
                code = self.triton.returncode
                if code is None or code >= 0 or crash_retries < 1:
                    raise
                crash_retries -= 1
                print(f"tritonserver was killed by signal {-code} while loading its models; starting it again "
                      f"(log: {self.log_dir / 'tritonserver.log'})", file=sys.stderr, flush=True)
                self._relaunch()
        self._watch()
        wait_http(f"{self.url}/health", 60, self.frontend)

    def _watch(self) -> None:
        """Remember Triton's stub processes and their shared memory, now that all models loaded."""
        self._stubs = children(self.triton.pid, STUB)
        self._shm |= shm_files([self.triton.pid, *self._stubs])

    def check(self) -> str | None:
        """Why the service cannot serve, or None: Triton exited, or one of its model processes died."""
        if self.frontend.poll() is not None:
            return f"the OpenAI adapter exited with code {self.frontend.returncode}"
        if self.triton.poll() is not None:
            return f"tritonserver exited with code {self.triton.returncode}"
        for pid in self._stubs:
            stat = _proc_stat(pid)
            if stat is None or stat[0] in ("Z", "X") or stat[1] != self.triton.pid:
                return f"a Triton model process (pid {pid}) died"
        if time.monotonic() >= self._next_shm_scan:     # regions a model created since: removed at stop too
            self._next_shm_scan = time.monotonic() + 10
            self._shm |= shm_files([self.triton.pid, *self._stubs])
        return None

    def restart(self, timeout_s: float = 600) -> None:
        """Kill Triton (its stubs with it) at once and start it again; the adapter stays up."""
        self._relaunch()
        wait_http(f"{self.triton_http}/v2/health/ready", timeout_s, self.triton)
        self._watch()

    def _relaunch(self) -> None:
        """Triton's process group killed, the regions known to be its removed (a Triton that died
        while loading left regions no one knew yet: swept once stale, at stop), and a new one."""
        self.restarts += 1
        _kill_group(self.triton, signal.SIGKILL)
        self.triton.wait()
        self._remove_shm()
        self.triton_log.write(f"\n==== restarting tritonserver ({time.strftime('%H:%M:%S')}) ====\n")
        self.triton_log.flush()
        self.triton = self._start_triton()

    def stop(self) -> None:
        if self.triton.poll() is None:      # stopped while starting: its regions were not seen yet
            self._shm |= shm_files([self.triton.pid, *children(self.triton.pid, STUB)])
        for proc in (self.frontend, self.triton):
            if proc.poll() is None:
                _kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.exit_timeout_s + 2
        for proc in (self.frontend, self.triton):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _kill_group(proc, signal.SIGKILL)      # the group: stubs Triton left behind too
            proc.wait()
        self._remove_shm()
        sweep_stale_regions()
        self.triton_log.close()
        self.frontend_log.close()

    def _remove_shm(self) -> None:
        for path in self._shm:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._shm.clear()
