"""How much of AD2's attention-KD loss is the student's attention dropout, not a real difference between maps.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/attention_kl_floor.py \\
        --teacher ~/.cache/ad2_ds/teachers/movie-polarity-all-MiniLM-L6-v2-n2000-len64-e3-s42

Hugging Face eager attention returns the attention probabilities *after* dropout, so in train mode about
``attention_probs_dropout_prob`` of each student row is exactly 0. ``losses.attention_kl`` clamps the student's
probabilities at 1e-12 before the log, so each dropped key adds ``p_t * 27.6`` nats with no gradient. This script
loads the teacher, builds the default student from its bottom layers (``bottom:3``, as the recipe does), and prints the
summed attention KL (the objective's ``attention`` term, all layer pairs) on dev batches with the student in eval mode
and in train mode, for the uniform and the bottom layer maps. Teacher always in eval mode, as in training.
"""

import argparse
import os

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student_layers", type=int, default=3)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=16)
    args = p.parse_args()

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ad2_ds.data.glue import load_task
    from ad2_ds.data.tasks import get_task
    from ad2_ds.losses import attention_kl
    from ad2_ds.matching import layer_pairs
    from ad2_ds.modeling import student_from_teacher

    torch.manual_seed(0)
    path = os.path.expanduser(args.teacher)
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    student = student_from_teacher(
        AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager"),
        args.student_layers,
        "bottom",
    )
    n_t = teacher.config.num_hidden_layers
    dev = load_task(get_task("movie-polarity"))["dev"]
    sentences = dev["text_a"][: args.batches * args.batch_size]
    print(f"attention dropout p = {student.config.attention_probs_dropout_prob}; {len(sentences)} dev sentences")
    print("map      student mode   summed attention KL (nats, all pairs)   per pair")
    for map_name in ("uniform", "bottom"):
        pairs = layer_pairs(map_name, args.student_layers, n_t)
        for mode in ("eval", "train"):
            student.train(mode == "train")
            totals, per_pair = [], torch.zeros(len(pairs))
            for i in range(0, len(sentences), args.batch_size):
                batch = tok(sentences[i : i + args.batch_size], padding=True, truncation=True, max_length=64,
                            return_tensors="pt")  # fmt: skip
                with torch.no_grad():
                    a_t = teacher(**batch, output_attentions=True).attentions
                    a_s = student(**batch, output_attentions=True).attentions
                vals = torch.stack([attention_kl(a_s[s - 1], a_t[t - 1], batch["attention_mask"]) for s, t in pairs])
                totals.append(vals.sum().item())
                per_pair += vals / args.batches
            mean = sum(totals) / len(totals)
            pairs_txt = ", ".join(f"{s}:{t} {v:.2f}" for (s, t), v in zip(pairs, per_pair.tolist()))
            print(f"{map_name:8} {mode:14} {mean:8.3f}                                {pairs_txt}")


if __name__ == "__main__":
    main()
