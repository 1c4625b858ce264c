"""A pool of gloo worker processes that run functions on every rank, reused across calls.

Spawning a rank costs seconds (importing torch dominates), so tests and the demo start a pool
once and send it many calls. Each call runs ``fn(*args)`` on every rank and returns the list of
per-rank results. A rank that raises, dies or overruns the timeout makes the call raise
:class:`RankFailure` naming the rank(s) and carrying their tracebacks; the pool is then torn down
(other ranks may be stuck in a collective) and rebuilt on the next call. Never a silent hang.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any


class RankFailure(RuntimeError):
    """A distributed call failed on at least one rank."""


def run_torchrun(nproc: int, *target: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node=nproc TARGET...`` on CPU ranks, one thread each.

    ``target`` is a script path or ``-m module`` with its arguments. The children import this
    same ``usp_npu`` (its source root goes first on PYTHONPATH); stdout and stderr are captured.
    """
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", *target]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=root)


def _stack_file(init_file: str, rank: int) -> str:
    return f"{init_file}.rank{rank}.stacks"


def _worker(rank: int, world_size: int, init_file: str, timeout_s: float, tasks, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # A call that overruns its time dumps every thread's stack here, so that the pool's report
    # of a hung rank says where it waits (the pool kills the rank soon after).
    stacks = open(_stack_file(init_file, rank), "w")  # noqa: SIM115 (open for the process's life)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        results.put((rank, "ready", None))
    except Exception:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        call_id, fn, args, kwargs = task
        stacks.seek(0)
        stacks.truncate()
        faulthandler.dump_traceback_later(max(1.0, timeout_s - 5), file=stacks)
        try:
            results.put((rank, call_id, ("ok", fn(*args, **kwargs))))
        except BaseException:
            results.put((rank, call_id, ("error", traceback.format_exc())))
        finally:
            faulthandler.cancel_dump_traceback_later()
    dist.destroy_process_group()


class ProcessGroupPool:
    """``world_size`` spawned ranks in one gloo process group.

    ``timeout_s`` bounds each call and every collective inside it.
    """

    def __init__(self, world_size: int, timeout_s: float = 120.0):
        self.world_size, self.timeout_s = world_size, timeout_s
        self._procs: list[mp.Process] = []
        self._calls = 0

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> ProcessGroupPool:
        if self._procs:
            return self
        ctx = mp.get_context("spawn")
        fd, init_file = tempfile.mkstemp(prefix="usp_npu_pg_")
        os.close(fd)
        os.unlink(init_file)  # the FileStore creates it
        self._init_file = init_file
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, self.world_size, init_file, self.timeout_s, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        ready = self._collect("ready", self.timeout_s)
        failed = {r: v for r, v in ready.items() if v is not None}
        if failed:
            self.close()
            raise RankFailure(self._describe("start-up", failed))
        return self

    def close(self) -> None:
        for p, q in zip(self._procs, getattr(self, "_tasks", []), strict=False):
            if p.is_alive():
                q.put(None)
        deadline = time.monotonic() + 5
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []
        init_file = getattr(self, "_init_file", None)
        for path in [init_file] + [_stack_file(init_file, r) for r in range(self.world_size)]:
            if init_file and os.path.exists(path):
                os.unlink(path)

    def __enter__(self) -> ProcessGroupPool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calls ---------------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank (``fn`` importable by name); per-rank results."""
        self.start()
        self._calls += 1
        call_id = self._calls
        for q in self._tasks:
            q.put((call_id, fn, args, kwargs))
        got = self._collect(call_id, self.timeout_s + 10)
        errors = {r: v[1] for r, v in got.items() if v is not None and v[0] == "error"}
        missing = [r for r in range(self.world_size) if r not in got]
        if errors or missing:
            detail = dict(errors)
            for r in missing:
                detail[r] = f"no answer within {self.timeout_s:.0f} s (hung or died)"
                detail[r] += self._stacks(r)
            self.close()  # peers of a failed rank may be blocked in a collective
            raise RankFailure(self._describe(getattr(fn, "__name__", str(fn)), detail))
        return [got[r][1] for r in range(self.world_size)]

    def _collect(self, key, timeout_s: float) -> dict[int, Any]:
        """Gather one message per rank for ``key`` until all came, one failed, or time ran out."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < self.world_size:
            try:
                rank, k, value = self._results.get(
                    timeout=min(1.0, max(0.01, deadline - time.monotonic()))
                )
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in got]
                if dead or time.monotonic() > deadline:
                    for r in dead:
                        got[r] = ("error", f"process exited with code {self._procs[r].exitcode}")
                    break
                continue
            if k == "error":  # start-up failure
                got[rank] = value
            elif k == key:
                got[rank] = value
                if isinstance(value, tuple) and value[0] == "error":
                    # give the peers a moment to report their own errors, then stop waiting
                    deadline = min(deadline, time.monotonic() + 2.0)
        return got

    def _stacks(self, rank: int) -> str:
        """The thread stacks rank ``rank`` dumped when its call overran, if it did."""
        try:
            text = Path(_stack_file(self._init_file, rank)).read_text()
        except OSError:
            return ""
        return f"; its threads when the time ran out:\n{text}" if text.strip() else ""

    def _describe(self, what: str, failures: dict[int, Any]) -> str:
        lines = [f"{what} failed on rank(s) {sorted(failures)} of {self.world_size}:"]
        for r in sorted(failures):
            lines.append(f"--- rank {r} ---\n{failures[r]}")
        return "\n".join(lines)
