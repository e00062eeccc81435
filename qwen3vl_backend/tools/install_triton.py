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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=".cache/triton")
    args = ap.parse_args(argv)
    print(json.dumps(install(Path(args.dest).resolve())))


if __name__ == "__main__":
    main()
