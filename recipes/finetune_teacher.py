"""Fine-tune a teacher on a task, the first step of task-specific distillation.

    deepspeed recipes/finetune_teacher.py --deepspeed ds_configs/zero2.json --task movie-polarity \
        --model all-MiniLM-L6-v2 --output_dir runs/teacher-movie
    # then: recipes/distill_glue.py --teacher runs/teacher-movie/best ...

It is distill_glue.py with ``--method finetune`` and the model as the student (all of its flags apply). With no
``--teacher``, distill_glue.py calls :func:`ensure_default_teacher`, which runs this once and keeps the result in
the cache (``$AD2_CACHE/teachers/``) for later runs.
"""

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distill_glue  # noqa: E402

DEFAULT_MODEL = "all-MiniLM-L6-v2"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Fine-tune a teacher; other flags go to distill_glue.py")
    p.add_argument("--model", default=DEFAULT_MODEL, help="pre-trained checkpoint (path, hub or packaged name)")
    known, rest = p.parse_known_args(argv)
    if any(a == "--method" or a.startswith("--method=") for a in rest):
        print("error: finetune_teacher.py always uses --method finetune", file=sys.stderr)
        return 2
    return distill_glue.main(["--method", "finetune", "--student", known.model, *rest])


def default_teacher_dir(args, task) -> str:
    from ad2_ds.data.assets import cache_root
    from ad2_ds.data.offline import SPLIT_VERSION

    # an offline task's default data is that layout's train split (v2: without the test examples)
    layout = f"-split{SPLIT_VERSION}" if task.is_offline and not args.data_dir else ""
    key = (
        f"{task.name}{layout}-{DEFAULT_MODEL}-n{args.max_train_samples}-len{args.max_seq_length}"
        f"-e{args.teacher_epochs}-s{args.teacher_seed}"
    )
    if args.data_dir:
        key += "-" + os.path.abspath(args.data_dir).strip("/").replace("/", "_")
    return str(cache_root() / "teachers" / key)


def ensure_default_teacher(args, task) -> str:
    """The default teacher for ``task``: all-MiniLM-L6-v2 fine-tuned here once, then reused from the cache."""
    import torch.distributed as dist

    target = default_teacher_dir(args, task)
    if os.path.isfile(os.path.join(target, "config.json")):
        if dist.get_rank() == 0:
            print(f"teacher: reusing {target}", flush=True)
        return target
    run_dir = target + ".run"
    if dist.get_rank() == 0:
        print(
            f"teacher: fine-tuning {DEFAULT_MODEL} on {task.name} ({args.teacher_epochs} epochs) -> {target}",
            flush=True,
        )
        shutil.rmtree(run_dir, ignore_errors=True)
    ds_path = run_dir + ".ds_config.json"
    if dist.get_rank() == 0:
        write_teacher_ds_config(args.ds_config, ds_path)
    dist.barrier()
    argv = [
        "--task",
        task.name,
        "--model",
        DEFAULT_MODEL,
        "--output_dir",
        run_dir,
        "--deepspeed",
        ds_path,
        "--num_train_epochs",
        str(args.teacher_epochs),
        "--max_train_samples",
        str(args.max_train_samples),
        "--max_seq_length",
        str(args.max_seq_length),
        "--seed",
        str(args.teacher_seed),
    ]
    if args.data_dir:
        argv += ["--data_dir", args.data_dir]
    if args.no_progress:
        argv.append("--no_progress")
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"fine-tuning the default teacher failed (exit {code}); see {run_dir}")
    if dist.get_rank() == 0:
        os.replace(os.path.join(run_dir, "best"), target)  # atomic: a half-trained teacher is never reused
        shutil.copy(os.path.join(run_dir, "results.json"), os.path.join(target, "finetune_results.json"))
        shutil.rmtree(run_dir, ignore_errors=True)
        os.remove(ds_path)
    dist.barrier()
    return target


MONITORS = ("csv_monitor", "tensorboard", "wandb", "comet")


def write_teacher_ds_config(student_ds_config: dict, out_path: str) -> None:
    """The student run's DeepSpeed config without its monitors: the teacher's fine-tuning must not write its losses
    into the student's monitor files (DeepSpeed appends to them)."""
    from ad2_ds.utils import write_json_atomic

    write_json_atomic(out_path, {k: v for k, v in student_ds_config.items() if k not in MONITORS})


if __name__ == "__main__":
    code = main()
    from ad2_ds.dist import clean_exit

    clean_exit(code)
