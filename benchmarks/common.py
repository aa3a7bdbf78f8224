"""What the benchmark scripts share: the machine they ran on, and whether another training job is running."""

import datetime
import os
import platform
import subprocess


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        return platform.processor()


def quiet() -> bool:
    """No other training job: no ``distill_glue`` run and no ``sweep_glue`` driver (which starts them one by one)."""
    busy = subprocess.run(["pgrep", "-f", "distill_glue|sweep_glue"], capture_output=True, text=True).stdout
    return not busy.strip()


def environment(threads=None, **extra) -> dict:
    """Machine, library versions and date, for the JSON a benchmark writes next to its numbers."""
    import deepspeed
    import torch
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
