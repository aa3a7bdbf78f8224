"""Run a function on N gloo ranks on 127.0.0.1, for tests (like accelerate's ``debug_launcher``)::

    from ad2_ds.testing import launch

    def _check(rank, world_size, seed):      # module level: it must be importable under "spawn"
        dist.init_distributed()
        ...
        return some_picklable_result

    results = launch(_check, world_size=2, args=(0,), timeout_s=120)   # [result of rank 0, result of rank 1]

Each rank runs in its own process with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (a free port) and
OMP_NUM_THREADS=1 set; ``fn`` calls ``ad2_ds.dist.init_distributed()`` itself. A rank that raises makes ``launch``
raise ``RuntimeError`` carrying that rank's traceback (the other ranks, likely stuck in a collective, are killed);
a job that does not finish within ``timeout_s`` is killed and raises ``TimeoutError`` carrying the Python stacks of
every thread of the ranks still running (where they hung), so a hang fails the test instead of hanging CI, and says
why. Ranks end with ``dist.clean_exit`` (no SIGABRT at exit).
"""

import faulthandler
import gc
import multiprocessing as mp
import os
import pickle
import signal
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable, List, Optional, Sequence

from . import dist
from .patches import reset_deepspeed_state  # noqa: F401  (re-exported: tests import it from here)
from .trainer import Callback


def _worker(fn, rank, world_size, port, args, kwargs, conn, stacks_path) -> None:
    # A forked rank inherits the parent's heap, garbage included. Collected here, an object whose finalizer joins
    # native threads or takes a lock of the parent (a leaked gloo process group, a thread pool) waits forever: those
    # threads were not copied. Freeze what was inherited so the rank's GC never finalizes it (seen: both ranks of a
    # recipe hung "Garbage-collecting" in from_pretrained late in the full suite, never alone).
    gc.freeze()
    # SIGUSR1 from the parent (on a timeout) writes every thread's Python stack to stacks_path, even while the main
    # thread is blocked in a collective (faulthandler dumps from the C signal handler, without the GIL).
    stacks = open(stacks_path, "w")  # noqa: SIM115 - open until the process ends
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        LOCAL_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    code = 0
    try:
        import torch

        torch.set_num_threads(1)
        reset_deepspeed_state()
        result = fn(rank, world_size, *args, **kwargs)
        payload = ("ok", result)
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent
        payload = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        code = 1
    try:
        # Plain pickle: torch's multiprocessing reductions would hand tensors over by shared memory, which dies
        # with this process at os._exit.
        conn.send_bytes(pickle.dumps(payload))
    except Exception as e:  # noqa: BLE001 - an unpicklable result is a failure too
        conn.send_bytes(pickle.dumps(("error", f"rank {rank}: could not send the result: {e!r}")))
        code = 1
    conn.close()
    dist.clean_exit(code)


def launch(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    kwargs: Optional[dict] = None,
    timeout_s: float = 120.0,
    start_method: Optional[str] = None,
) -> List[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes; return the results in rank order.

    start_method: "fork" (default where available and this process runs one Python thread: no re-import of torch,
    ~5 s faster per rank), else "forkserver" (preloaded with torch, deepspeed and transformers), or "spawn" (with
    forkserver and spawn, ``fn`` and ``args`` must pickle). Fork is refused when this process has initialized
    torch.distributed itself.
    """
    import torch.distributed as tdist

    if start_method is None:
        start_method = "fork" if "fork" in mp.get_all_start_methods() and _fork_is_safe() else "forkserver"
    if start_method == "fork" and tdist.is_available() and tdist.is_initialized():
        raise RuntimeError("launch(start_method='fork') from a process with torch.distributed initialized: use spawn")
    ctx = mp.get_context(start_method)
    if start_method == "fork":
        gc.collect()  # finalize the parent's garbage here, where its threads exist (see _worker)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["torch", "deepspeed", "transformers", "ad2_ds.dist"])
    port = dist.find_free_port()
    procs, conns = [], []
    stacks_dir = tempfile.TemporaryDirectory(prefix="launch-stacks-")
    stacks = [os.path.join(stacks_dir.name, f"rank{rank}.txt") for rank in range(world_size)]
    for rank in range(world_size):
        recv, send = ctx.Pipe(duplex=False)
        job = (fn, rank, world_size, port, tuple(args), dict(kwargs or {}), send, stacks[rank])
        p = ctx.Process(target=_worker, args=job, daemon=True)
        p.start()
        send.close()
        procs.append(p)
        conns.append(recv)

    results: List[Any] = [None] * world_size
    pending = dict(enumerate(conns))
    errors = []
    deadline = time.monotonic() + timeout_s
    try:
        while pending and not errors:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"launch: ranks {sorted(pending)} of {world_size} did not finish within {timeout_s:.0f} s "
                    "(a hang, e.g. ranks waiting in different collectives); where they were:\n"
                    + _stacks_of({r: procs[r] for r in pending}, stacks)
                )
            ready = wait(list(pending.values()) + [procs[r].sentinel for r in pending], timeout=min(left, 1.0))
            for rank, conn in list(pending.items()):
                if conn in ready:
                    try:
                        status, value = pickle.loads(conn.recv_bytes())
                    except EOFError:
                        procs[rank].join(5)
                        status, value = "error", f"died without a result (exit code {procs[rank].exitcode})"
                    del pending[rank]
                    if status == "ok":
                        results[rank] = value
                    else:
                        errors.append((rank, value))
                elif procs[rank].sentinel in ready and not conn.poll():
                    procs[rank].join(5)
                    del pending[rank]
                    errors.append((rank, f"died without a result (exit code {procs[rank].exitcode})"))
        if errors:
            rank, msg = errors[0]
            raise RuntimeError(f"launch: rank {rank} of {world_size} failed: {msg}")
        for p in procs:
            p.join(10)
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        for c in conns:
            c.close()
        stacks_dir.cleanup()


def _fork_is_safe() -> bool:
    """Fork copies only the calling thread: a lock another Python thread holds at that moment (an import lock,
    tqdm's, a queue's) stays held forever in the child. Fork only when this is the process's one Python thread."""
    return threading.active_count() == 1


def _stacks_of(procs, paths, wait_s: float = 3.0) -> str:
    """Ask each still-running rank for its threads' Python stacks (SIGUSR1, see ``_worker``) and return them."""
    for p in procs.values():
        if p.is_alive():
            os.kill(p.pid, signal.SIGUSR1)
    time.sleep(wait_s)
    parts = []
    for rank in procs:
        try:
            with open(paths[rank]) as f:
                text = f.read().strip()
        except OSError:
            text = ""
        parts.append(f"--- rank {rank} ---\n{text or '(no stacks: the rank did not start or did not answer)'}")
    return "\n".join(parts)


class FaultAt(Callback):
    """A fault injected through the loop's step callbacks: this process gets SIGKILL or SIGTERM after ``at``
    micro-steps of this run, on global rank ``rank`` only when given. ``FaultAt.parse("kill@7")``, ``"term@3:0"``."""

    def __init__(self, kind: str, at: int, rank: Optional[int] = None):
        if kind not in ("kill", "term"):
            raise ValueError(f"fault kind must be kill or term, got {kind!r}")
        self.kind, self.at, self.rank, self.steps = kind, at, rank, 0

    @classmethod
    def parse(cls, spec: str) -> "FaultAt":
        kind, _, at = spec.partition("@")
        at, _, rank = at.partition(":")
        return cls(kind, int(at), int(rank) if rank else None)

    def on_micro_step(self, state, losses) -> None:
        self.steps += 1
        if self.steps == self.at and (self.rank is None or dist.get_rank() == self.rank):
            os.kill(os.getpid(), {"kill": signal.SIGKILL, "term": signal.SIGTERM}[self.kind])
