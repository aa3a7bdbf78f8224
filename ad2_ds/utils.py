"""Small I/O helpers: ``write_json_atomic(path, obj)`` (temp file + rename, so a kill never leaves half a file);
``exclusive(lock_path, what)``: one job at a time builds a shared thing (a teacher cache, the default teacher)."""

import contextlib
import json
import os
import tempfile

_HELD = set()  # lock files this process holds: exclusive() is re-entrant


@contextlib.contextmanager
def exclusive(lock_path, what: str, group=None):
    """Run the block while holding an exclusive ``flock`` on ``lock_path``, so two jobs that build the same thing
    (two runs of a sweep started together on one teacher cache or default teacher) take turns: the second waits,
    saying so, then finds the first one's result. In a distributed job the group's rank 0 holds the lock and the
    other ranks wait for it at a barrier (call on every rank of ``group``). The lock dies with its process (kill -9
    leaves nothing to clean up); the empty lock file stays. Re-entrant within a process."""
    import fcntl

    import torch.distributed as tdist

    lock_path = os.path.abspath(lock_path)
    on = tdist.is_available() and tdist.is_initialized()
    f = None
    if (tdist.get_rank(group) if on else 0) == 0 and lock_path not in _HELD:
        os.makedirs(os.path.dirname(lock_path), exist_ok=True)
        f = open(lock_path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{what}: another process holds {lock_path}; waiting for it to finish", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks: go on unguarded, as before there was a lock
            print(f"{what}: cannot lock {lock_path} ({e}); not guarded against a concurrent build", flush=True)
        _HELD.add(lock_path)
    if on:
        tdist.barrier(group=group)
    try:
        yield
    finally:
        if f is not None:
            _HELD.discard(lock_path)
            f.close()  # releases the lock


def write_json_atomic(path: str, obj) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_monitor_csv(path: str):
    """``[(step, value), ...]`` of one DeepSpeed CSV-monitor file (``step,<name>`` rows).

    DeepSpeed appends to these files and writes the header again each time a process opens them. A block whose
    steps continue the previous one (a resumed run) is kept with it; a block that starts again from a lower step is a
    different run writing to the same folder, and only the last such run is returned.
    """
    import csv

    blocks = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if len(row) < 2:
                continue
            try:
                step, value = int(float(row[0])), float(row[1])
            except ValueError:  # a header line: a new process started writing
                blocks.append([])
                continue
            if not blocks:
                blocks.append([])
            blocks[-1].append((step, value))
    rows = []
    for block in (b for b in blocks if b):
        first = block[0][0]
        if rows and first <= rows[0][0]:
            rows = []  # starts again at or before the first step seen: a new run, not a continuation
        rows = [r for r in rows if r[0] < first] + block  # a resume from a checkpoint replaces the steps it repeats
    return rows
