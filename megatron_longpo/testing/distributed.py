"""Run a function on N gloo processes with real torch.distributed, for tests and benchmarks.

    results = run_distributed(fn, world_size=2, args=(...), timeout=120)

``fn`` must be importable (a module-level function) because workers are started with the
``spawn`` method. Each rank returns ``fn(*args)``; the list of per-rank results comes back.

Workers are pooled per world size and reused across calls: starting a process that imports torch
and megatron-core costs seconds on a 2-core machine, and a test suite makes hundreds of calls.
Between calls Megatron's parallel state is destroyed, so each call starts clean. If any rank
raises, every rank's traceback is put into the raised :class:`DistributedTestError`; if the call
does not finish within ``timeout`` (a hung collective), the pool is killed and the error names the
ranks that did not answer. A killed or broken pool is rebuilt on the next call.
Workers are not daemonic because dist_checkpointing starts helper processes of its own; an
atexit hook stops them.
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from megatron_longpo.runtime import cpu_compat


class DistributedTestError(AssertionError):
    """One or more ranks failed (message holds their tracebacks) or timed out."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    # Keep each worker to one intra-op thread: N workers share the machine's cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        cpu_compat.enable()
        dist.init_process_group("gloo", rank=rank, world_size=world)
    except BaseException:
        results.put((rank, False, "worker start-up failed:\n" + traceback.format_exc()))
        return
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            out = fn(*args, **kwargs)
            results.put((rank, True, out))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
        finally:
            _reset_megatron_state()
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def _reset_megatron_state() -> None:
    """Destroy Megatron's parallel state AND every process group except the world group.

    ``initialize_model_parallel`` creates dozens of groups (NCCL/gloo pairs per dimension), and
    ``destroy_model_parallel`` only drops Megatron's references to them: torch keeps each one
    registered, with its gloo I/O threads. Reusing a worker for hundreds of calls would pile up
    thousands of threads, so the groups are destroyed here explicitly.
    """
    try:
        # deferred: workers import this module before cpu_compat.enable()
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
    except Exception:
        pass
    gc.collect()
    for pg in list(c10d._world.pg_map):
        if pg is not c10d.GroupMember.WORLD:
            try:
                dist.destroy_process_group(pg)
            except Exception:
                pass
    gc.collect()


class _Pool:
    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        self.results: mp.Queue = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        port = _free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world, port, self.tasks[r], self.results), daemon=False)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable, args: Sequence, kwargs: dict, timeout: float) -> list:
        for q in self.tasks:
            q.put((fn, tuple(args), kwargs))
        out: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(out) + len(failures) < self.world:
            try:
                rank, ok, value = self.results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in out and r not in failures]
                if dead:
                    self.kill()
                    raise DistributedTestError(
                        f"rank(s) {dead} died (exit codes {[self.procs[r].exitcode for r in dead]}) "
                        f"running {fn.__module__}.{fn.__name__}" + _fmt(failures)
                    )
                if time.monotonic() > deadline:
                    missing = [r for r in range(self.world) if r not in out and r not in failures]
                    self.kill()
                    raise DistributedTestError(
                        f"timeout after {timeout:.0f}s running {fn.__module__}.{fn.__name__}: "
                        f"rank(s) {missing} did not finish (hung collective?)" + _fmt(failures)
                    )
                continue
            if ok:
                out[rank] = value
            else:
                failures[rank] = value
                # Other ranks may now block in a collective: give them a short grace period.
                deadline = min(deadline, time.monotonic() + 15)
        if failures:
            raise DistributedTestError(
                f"{len(failures)} of {self.world} rank(s) failed in {fn.__module__}.{fn.__name__}" + _fmt(failures)
            )
        return [out[r] for r in range(self.world)]

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)
        _POOLS.pop(self.world, None)

    def close(self) -> None:
        for q in self.tasks:
            try:
                q.put(None)
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


def _fmt(failures: dict[int, str]) -> str:
    return "".join(f"\n\n----- rank {r} -----\n{tb}" for r, tb in sorted(failures.items()))


_POOLS: dict[int, _Pool] = {}


def run_distributed(
    fn: Callable, world_size: int, args: Sequence = (), kwargs: Optional[dict] = None, timeout: float = 300.0
) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return per-rank results."""
    pool = _POOLS.get(world_size)
    if pool is not None and not pool.alive():
        pool.kill()
        pool = None
    if pool is None:
        pool = _POOLS[world_size] = _Pool(world_size)
    try:
        return pool.run(fn, args, kwargs or {}, timeout)
    except DistributedTestError as e:
        # A failed rank may leave the others in a collective; start the next call fresh.
        if "failed in" in str(e):
            pool.kill()
        raise


@atexit.register
def shutdown_pools() -> None:
    for pool in list(_POOLS.values()):
        pool.close()
    _POOLS.clear()
