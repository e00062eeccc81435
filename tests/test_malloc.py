"""serving/malloc.keep_freed_memory: a PNG decode's pages reused from one request to the next."""

from __future__ import annotations

import subprocess
import sys

import pytest

# decodes a 1280x720 noise PNG six times on the main thread and prints the page faults of each
SCRIPT = """
import io, resource, sys
import numpy as np
from PIL import Image
from qwen3vl_backend.processing.media import decode_image_array
from qwen3vl_backend.serving.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
buf = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (720, 1280, 3), dtype=np.uint8)).save(buf, format="PNG")
data = buf.getvalue()
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    decode_image_array(data, 1 << 26)
    print(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
"""


def _faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [int(x) for x in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt, RUSAGE_THREAD")
def test_a_decode_reuses_the_last_ones_pages():
    """After the first decode, the next ones fault in almost nothing (a 1280x720 decode's buffers are
    ~2,700 pages; on this project's CI host each decode faulted all of them in again without it)."""
    kept = _faults("keep")
    assert max(kept[1:]) < 200, kept
