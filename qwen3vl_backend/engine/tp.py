"""The tensor-parallel group at run time (qwen3vl_backend/parallel.py has the layout).

`start_local_workers` starts this node's ranks other than the engine's (rank 0 on node 0; all
of them on other nodes, from `engine.tp_worker --node-rank`), each a
`python -m qwen3vl_backend.engine.tp_worker` process that dies with its parent (PDEATHSIG).
`Watchdog` ends the engine's process when a worker dies (`fatal`): the group's next collective would
otherwise wait for it (NCCL until its timeout), so requests fail at once and the server's
supervisor (or the user) restarts the group. `StepChannel` carries a step from rank 0 to the
others: a small header over a gloo group, then the step's integer inputs packed into one tensor
and, for steps with images, the visual rows, over the default group.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..parallel import disable_multicast
from ..supervisor import _die_with_parent

log = logging.getLogger(__name__)


def python_executable() -> str:
    """The interpreter to start workers with: inside Triton's Python backend sys.executable is
    the stub, so the environment's own python (sys.prefix) comes first."""
    for cand in (Path(sys.prefix) / "bin" / "python3", Path(sys.prefix) / "bin" / "python", Path(sys.executable)):
        if cand.exists() and os.access(cand, os.X_OK) and "stub" not in cand.name:
            return str(cand)
    return "python3"


def start_local_workers(settings: dict, ranks: list[int]) -> list[subprocess.Popen]:
    """One process per rank; `settings` are the EngineConfig's (dist_init_addr filled in)."""
    env = disable_multicast(dict(os.environ))
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs = []
    for rank in ranks:
        cmd = [python_executable(), "-m", "qwen3vl_backend.engine.tp_worker", "--rank", str(rank),
               "--settings", json.dumps(settings)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=root, preexec_fn=_die_with_parent))
    return procs


def init_group(rank: int, world: int, addr: str, backend: str, timeout_s: float):
    """The default process group and a gloo group for step headers."""
    disable_multicast()
    dist.init_process_group(backend, init_method=f"tcp://{addr}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD


# how long a rank waits for the others to take the group down with it
GROUP_SHUTDOWN_S = 15.0


def shutdown_group(timeout_s: float = GROUP_SHUTDOWN_S) -> bool:
    """Destroy this process's groups. With NCCL this is collective (the communicators are
    finalized together): every rank calls it at about the same time, after dropping the CUDA
    graphs that captured its collectives. In a daemon thread, so a rank that never joins costs
    `timeout_s` (-> False) rather than a hang; the process should not start a group again then."""
    done = threading.Event()

    def destroy():
        try:
            dist.destroy_process_group()
        except Exception as e:                 # already destroyed, or a peer's failure surfacing here
            log.warning("destroying the tensor-parallel group: %s", e)
        finally:
            done.set()

    threading.Thread(target=destroy, daemon=True, name="tp-shutdown").start()
    if not done.wait(timeout_s):
        log.warning("the tensor-parallel group was not destroyed within %.0f s (a rank did not join)", timeout_s)
        return False
    return True


def fatal(msg: str) -> None:
    """End this process (status 70): the group cannot go on. The message goes to the log and stderr."""
    log.error(msg)
    print(msg, file=sys.stderr, flush=True)
    os._exit(70)


class Watchdog(threading.Thread):
    """Ends this process (exit status 70) when a worker exits: the group cannot go on without it."""

    def __init__(self, procs: list[subprocess.Popen]):
        super().__init__(daemon=True, name="tp-watchdog")
        self.procs, self.stopping = procs, threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            for p in self.procs:
                code = p.poll()
                if code is not None and not self.stopping.is_set():
                    for other in self.procs:
                        if other.poll() is None:
                            other.kill()
                    fatal(f"tensor-parallel worker (pid {p.pid}) exited with status {code}; the engine stops")


class StepChannel:
    """Rank 0 sends, the other ranks receive, the inputs of each forward pass."""

    def __init__(self, ctrl_group, device: torch.device, dtype: torch.dtype, hidden: int, block_size: int):
        self.ctrl, self.device, self.dtype, self.hidden, self.block_size = ctrl_group, device, dtype, hidden, block_size

    # rank 0
    def send(self, header: dict, ids, positions, meta, vis_embeds=None, vis_mask=None, deepstack=()) -> None:
        s, w = meta.block_tables.shape
        t = ids.shape[0]
        header = {**header, "t": t, "s": s, "w": w, "query_lens": meta.query_lens, "context_lens": meta.context_lens,
                  "vis": None if vis_embeds is None else (vis_embeds.shape[0], len(deepstack))}
        dist.broadcast_object_list([header], src=0, group=self.ctrl)
        if header["op"] == "stop":
            return
        packed = torch.cat([ids.long(), positions.reshape(-1).long(), meta.slot_mapping.long(),
                            meta.block_tables.reshape(-1).long(), meta.context_lens_t.long()])
        dist.broadcast(packed, src=0)
        if vis_embeds is not None:
            for v in (vis_embeds.to(self.dtype), *(d.to(self.dtype) for d in deepstack)):
                dist.broadcast(v.contiguous(), src=0)
            dist.broadcast(vis_mask.to(torch.uint8), src=0)

    def stop(self) -> None:
        dist.broadcast_object_list([{"op": "stop"}], src=0, group=self.ctrl)

    # ranks 1..
    def receive(self):
        """-> (header, ids, positions, meta, vis_embeds, vis_mask, deepstack); header["op"] "stop": the rest None."""
        from ..layers.attention import AttentionMetadata

        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.ctrl)
        h = box[0]
        if h["op"] == "stop":
            return h, None, None, None, None, None, ()
        t, s, w = h["t"], h["s"], h["w"]
        packed = torch.empty(5 * t + s * w + s, dtype=torch.long, device=self.device)
        dist.broadcast(packed, src=0)
        ids, pos, slots, tables, ctx = packed.split([t, 3 * t, t, s * w, s])
        meta = AttentionMetadata(h["query_lens"], h["context_lens"], slots, tables.view(s, w).to(torch.int32),
                                 self.block_size, ctx.to(torch.int32))
        vis_embeds, vis_mask, deepstack = None, None, ()
        if h["vis"] is not None:
            nv, levels = h["vis"]
            parts = [torch.empty(nv, self.hidden, dtype=self.dtype, device=self.device) for _ in range(1 + levels)]
            for v in parts:
                dist.broadcast(v, src=0)
            vis_embeds, deepstack = parts[0], parts[1:]
            vis_mask = torch.empty(t, dtype=torch.uint8, device=self.device)
            dist.broadcast(vis_mask, src=0)
            vis_mask = vis_mask.bool()
        return h, ids, pos.view(3, t), meta, vis_embeds, vis_mask, deepstack


def wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
