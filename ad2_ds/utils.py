"""Small I/O helpers: ``write_json_atomic(path, obj)`` (temp file + rename, so a kill never leaves half a file)."""

import json
import os
import tempfile


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
