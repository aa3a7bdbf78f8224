"""Fine-tune a teacher on a task, the first step of task-specific distillation.

    deepspeed recipes/finetune_teacher.py --deepspeed ds_configs/zero2.json --task movie-polarity \
        --model all-MiniLM-L6-v2 --output_dir runs/teacher-movie
    # then: recipes/distill_glue.py --teacher runs/teacher-movie/best ...

It is a distillation run with method ``finetune`` and the model as the student (all of distill_glue.py's flags
apply). With no ``--teacher``, distill_glue.py fine-tunes its default teacher the same way, once, and keeps it in the
cache (``$AD2_CACHE/teachers/``; ad2_ds.default_teacher).
"""

import sys

from ad2_ds.cli import config_from_args, run_cli, run_parser
from ad2_ds.default_teacher import DEFAULT_MODEL
from ad2_ds.dist import clean_exit


def main(argv=None) -> int:
    p = run_parser(__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL, help="pre-trained checkpoint (path, hub or packaged name)")
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--method" or a.startswith("--method=") for a in argv):
        print("error: finetune_teacher.py always uses --method finetune", file=sys.stderr)
        return 2
    args = p.parse_args(argv)
    args.method = "finetune"
    return run_cli(lambda: config_from_args(args, student=args.model, progress_label="teacher fine-tune"))


if __name__ == "__main__":
    clean_exit(main())
