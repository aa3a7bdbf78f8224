"""Bad input: one clear line on stderr, a non-zero exit, nothing the user had is touched, before expensive work."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ad2_ds.dist import find_free_port

ROOT = Path(__file__).resolve().parents[1]


def _argv(data, teacher, ds, out, *extra):
    return ["--deepspeed", str(ds), "--task", "sst2", "--data_dir", str(data), "--teacher", str(teacher),
            "--student_layers", "bottom:1", "--max_seq_length", "16", "--output_dir", str(out), "--no_progress",
            "--num_train_epochs", "1", *extra]  # fmt: skip


def _snapshot(root):
    return {p: p.stat().st_mtime_ns for p in Path(root).rglob("*") if p.is_file()}


CASES = {
    "missing data dir": (lambda t, d, te, ds: {"--data_dir": str(t / "nope")}, "--data_dir"),
    "unknown task": (lambda t, d, te, ds: {"--task": "sst3"}, "unknown task 'sst3'"),
    "missing column": (
        lambda t, d, te, ds: {"--data_dir": str(_glue_variant(t, "sentence\tlabel", "sentence\tscore"))},
        "column",
    ),
    "empty split": (lambda t, d, te, ds: {"--data_dir": str(_glue_variant(t, None, None, empty="dev"))}, "empty"),
    "label outside the label set": (
        lambda t, d, te, ds: {"--data_dir": str(_glue_variant(t, "\t1\n", "\t7\n"))},
        "label",
    ),
    "teacher with other label count": (lambda t, d, te, ds: {"--task": "mnli", "--data_dir": str(_mnli(t))}, "labels"),
    "ds json not json": (lambda t, d, te, ds: {"--deepspeed": str(_write(t / "x.json", "{oops"))}, "not valid JSON"),
    "ds json fp16 on cpu": (
        lambda t, d, te, ds: {
            "--deepspeed": str(_write(t / "f.json", json.dumps({**_cfg(ds), "fp16": {"enabled": True}})))
        },
        "bf16",
    ),
    "ds json contradicts itself": (
        lambda t, d, te, ds: {
            "--deepspeed": str(_write(t / "c.json", json.dumps({**_cfg(ds), "train_batch_size": 7})))
        },
        "train_batch_size 7",
    ),
    "tp size does not divide world": (lambda t, d, te, ds: {"--teacher_tp_size": "2"}, "teacher_tp_size"),
    "negative epsilon": (lambda t, d, te, ds: {"--epsilon": "-1"}, "epsilon"),
    "negative alpha": (lambda t, d, te, ds: {"--alpha": "-1"}, "alpha"),
    "zero temperature": (lambda t, d, te, ds: {"--temperature": "0"}, "temperature"),
    "zero pga steps": (lambda t, d, te, ds: {"--pga_steps": "0"}, "pga_steps"),
    "unknown method": (lambda t, d, te, ds: {"--method": "ad3"}, "unknown method"),
    "radius schedule ending below zero": (
        lambda t, d, te, ds: {"--epsilon_schedule": "linear", "--epsilon_end": "-1"},
        "cannot end below zero",
    ),
    "end for a constant radius": (lambda t, d, te, ds: {"--epsilon_end": "0.5"}, "epsilon_schedule is constant"),
    "unknown radius schedule": (lambda t, d, te, ds: {"--epsilon_schedule": "exp"}, "epsilon_schedule must be one of"),
    "plateau cap below epsilon": (
        lambda t, d, te, ds: {"--epsilon_schedule": "plateau", "--epsilon_end": "0.5"},
        "must exceed epsilon",
    ),
    "bad student layers": (lambda t, d, te, ds: {"--student_layers": "middle:2"}, "--student_layers"),
    "augmentation without WordNet": (
        lambda t, d, te, ds: {"--augment_copies": "2", "--wordnet_dir": str(t)},
        "apt install wordnet-base",
    ),
    "augmentation alpha out of range": (
        lambda t, d, te, ds: {"--augment_copies": "2", "--augment_alpha": "0"},
        "--augment_alpha",
    ),
    "teacher without a trained head": (lambda t, d, te, ds: {"--teacher": str(_base_model(t))}, "no fine-tuned"),
    "test carved out of all of train": (lambda t, d, te, ds: {"--test_from_train": "1"}, "--test_from_train"),
    "test carved where a test split exists": (
        lambda t, d, te, ds: {"--task": "trec", "--data_dir": "", "--test_from_train": "0.1"},
        "already has a labelled test split",
    ),
}


def _cfg(ds):
    return json.loads(Path(ds).read_text())


def _write(path, text):
    path.write_text(text)
    return path


def _glue_variant(tmp, old, new, empty=None):
    import shutil

    src, dst = tmp / "glue" / "SST-2", tmp / "glue_bad" / "SST-2"
    shutil.rmtree(dst.parent, ignore_errors=True)
    shutil.copytree(src, dst)
    for split in ("train", "dev"):
        f = dst / f"{split}.tsv"
        text = f.read_text()
        if empty == split:
            text = text.splitlines()[0] + "\n"
        elif old is not None:
            text = text.replace(old, new, 1)
        f.write_text(text)
    return dst.parent


def _mnli(tmp):
    d = tmp / "glue_mnli" / "MNLI"
    d.mkdir(parents=True)
    header = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t" \
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"  # fmt: skip
    row = "0\t1\t1\tfiction\tx\tx\tx\tx\tthe movie\tthe film\tneutral\tneutral"
    for split in ("train", "dev_matched", "dev_mismatched"):
        (d / f"{split}.tsv").write_text(header + "\n" + row + "\n")
    return d.parent


def _base_model(tmp):
    from transformers import BertModel

    from conftest import tiny_bert_config

    path = tmp / "base"
    BertModel(tiny_bert_config()).save_pretrained(path)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_clear_line(world, case, capsys, no_dist_left):
    from recipes import distill_glue

    tmp, data, teacher, ds = world
    make, expected = CASES[case]
    overrides = make(tmp, data, teacher, ds)
    out = tmp / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    argv = _argv(data, teacher, ds, out)
    for flag, value in overrides.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    before = _snapshot(tmp)
    t0 = time.perf_counter()
    code = distill_glue.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: ") and expected in err[-1], err[-3:]
    assert len(err[-1]) < 400  # one line, not a traceback
    assert time.perf_counter() - t0 < 30  # before any training
    after = _snapshot(tmp)
    assert all(after.get(p) == m for p, m in before.items())  # nothing existing was touched or removed
    assert not (out / "results.json").exists() and not (out / "checkpoints").exists()


def test_an_existing_run_is_not_overwritten(world, capsys, no_dist_left):
    from recipes import distill_glue

    tmp, data, teacher, ds = world
    out = tmp / "run"
    out.mkdir()
    (out / "results.json").write_text('{"mine": true}')
    assert distill_glue.main(_argv(data, teacher, ds, out)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "results.json").read_text() == '{"mine": true}'
    assert distill_glue.main(_argv(data, teacher, ds, out, "--resume")) == 2  # nothing to resume
    assert "no checkpoint" in capsys.readouterr().err


def test_a_rank_that_dies_takes_the_job_down_naming_it(world):
    tmp, data, teacher, ds = world
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
        "--master_port", str(find_free_port()),
           str(ROOT / "tests" / "fault_run.py"), "--fault", "kill@2:1",
           *_argv(data, teacher, ds, tmp / "dies")]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode != 0
    log = res.stdout + res.stderr
    assert "--local_rank=1" in log and "exits with return code = -9" in log
    assert time.perf_counter() - t0 < 200  # the surviving rank did not hang in a collective


def test_sequences_longer_than_the_positions_are_cut_and_counted(world, caplog, no_dist_left):
    from recipes import distill_glue

    tmp, data, teacher, ds = world
    # the tiny models have 64 positions; one training sentence gets 80 words
    train = data / "SST-2" / "train.tsv"
    lines = train.read_text().splitlines()
    lines[1] = " ".join(["good"] * 80) + "\t1"
    train.write_text("\n".join(lines) + "\n")
    argv = _argv(data, teacher, ds, tmp / "long")
    argv[argv.index("--max_seq_length") + 1] = "100"
    with caplog.at_level("WARNING"):
        assert distill_glue.main(argv) == 0
    assert "exceeds the models' 64 positions: using 64" in caplog.text
    results = json.loads((tmp / "long" / "results.json").read_text())
    assert results["truncated"]["train"]["s"] == 1 and results["args"]["max_seq_length"] == 64
