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


def busy_processes() -> list:
    """PIDs of other training jobs: ``distill_glue`` runs and ``sweep_glue`` drivers (which start them one by one)."""
    out = subprocess.run(["pgrep", "-f", "distill_glue|sweep_glue"], capture_output=True, text=True).stdout
    return out.split()


def quiet() -> bool:
    """No other training job is running."""
    return not busy_processes()


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
