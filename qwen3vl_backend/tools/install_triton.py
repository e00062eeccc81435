"""Install the Triton server binary from the `nvidia-pytriton` wheel, unless one is on PATH.

    python -m qwen3vl_backend.tools.install_triton --dest .cache/triton   # prints the binary path

The wheel carries tritonserver 2.51 with the Python backend and one backend stub per Python
version; the stub for this interpreter is copied into backends/python/. Where `tritonserver`
is already on PATH (NGC containers), that one is used and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

WHEEL = "nvidia-pytriton==0.7.0"


def find_installed(dest: Path) -> dict | None:
    on_path = shutil.which("tritonserver")
    if on_path:
        backends = Path(os.environ.get("TRITON_BACKEND_DIR", "/opt/tritonserver/backends"))
        return {"tritonserver": on_path, "backend_dir": str(backends), "ld_library_path": python_libdir()}
    env_bin = os.environ.get("TRITONSERVER")
    if env_bin and Path(env_bin).exists():
        return {"tritonserver": env_bin, "backend_dir": os.environ.get("TRITON_BACKEND_DIR", ""),
                "ld_library_path": python_libdir()}
    root = dest / "pytriton" / "tritonserver"
    stub = root / "backends" / "python" / "triton_python_backend_stub"
    if (root / "bin" / "tritonserver").exists() and stub.exists():
        return _layout(dest)
    return None


def python_libdir() -> str:
    """The libpython of this interpreter: the backend stub must embed it, not a system one of the
    same minor version whose symbols the venv's stdlib extensions may not find."""
    return sysconfig.get_config_var("LIBDIR") or ""


def _layout(dest: Path) -> dict:
    root = dest / "pytriton" / "tritonserver"
    return {"tritonserver": str(root / "bin" / "tritonserver"), "backend_dir": str(root / "backends"),
            "ld_library_path": ":".join(p for p in (python_libdir(), str(dest / "nvidia_pytriton.libs")) if p)}


def install(dest: Path) -> dict:
    found = find_installed(dest)
    if found:
        return found
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL], check=True)
        [wheel] = Path(tmp).glob("nvidia_pytriton-*.whl")
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist()
                       if m.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/"))]
            z.extractall(dest, members)
    root = dest / "pytriton" / "tritonserver"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise SystemExit(f"{WHEEL} has no Python backend stub for Python {version}")
    shutil.copy(stub, root / "backends" / "python" / "triton_python_backend_stub")
    for exe in (root / "bin" / "tritonserver", root / "backends" / "python" / "triton_python_backend_stub"):
        exe.chmod(0o755)
    return _layout(dest)


def stub_numpy_error(layout: dict, env_prefix: str) -> str | None:
    """Why the wheel's Python backend stub cannot serve from `env_prefix` (a repository's
    EXECUTION_ENV_PATH), or None. That stub (Triton 2.51, built with pybind11 2.11) reads string
    tensors wrong under numpy 2: a request's first string input crashes its model's stub (the
    preprocess model's, on the first request with an image), and every such request fails with a
    500. Triton from 2.53 on (NGC 24.12 and later, pybind11 2.12) runs either numpy; a tritonserver
    from PATH or $TRITONSERVER that is not the wheel's is not checked. The stub ignores
    PYTHONPATH, so the environment's own interpreter is asked, without it."""
    if "pytriton" not in Path(layout["tritonserver"]).parts:
        return None
    bin_dir = Path(env_prefix) / "bin"
    python = next((bin_dir / n for n in ("python3", "python") if (bin_dir / n).exists()), None)
    if python is None:
        return None
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        out = subprocess.run([str(python), "-c", "import numpy; print(numpy.__version__)"], capture_output=True,
                             text=True, env=env, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = out.stdout.strip()
    if out.returncode != 0 or not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 2:
        return None
    return (f"the Python environment {env_prefix} has numpy {version}, and the Python backend stub of {WHEEL}'s "
            f"tritonserver 2.51 needs numpy < 2 (it reads string inputs wrong under numpy 2: every request with "
            f"media would fail). Serve from an environment with numpy < 2 (make venv builds one; on a host whose "
            f"Python has numpy 2, ../shared/gpu-host/activate.sh makes /tmp/pyenv), or use Triton 2.53 or later "
            f"(NGC 24.12+) on PATH")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=".cache/triton")
    args = ap.parse_args(argv)
    print(json.dumps(install(Path(args.dest).resolve())))


if __name__ == "__main__":
    main()
