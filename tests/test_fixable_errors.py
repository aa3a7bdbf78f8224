"""What a user can fix gets one line naming the fix, exit 2, and nothing written: a master port another job holds,
a damaged or stale teacher cache (--rebuild_teacher_cache), a csv row or JSON line that does not parse (its line
number), an empty text. Also the progress bars a run with a teacher cache shows, labelled by phase."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _argv(data, teacher, ds, out, *extra):
    return ["--deepspeed", str(ds), "--task", "sst2", "--data_dir", str(data), "--teacher", str(teacher),
            "--student_layers", "bottom:1", "--max_seq_length", "16", "--output_dir", str(out),
            "--num_train_epochs", "1", "--method", "kd", *extra]  # fmt: skip


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and len(lines[0]) < 400, err[-2000:]  # one line (logging's own errors aside: a handler
    return lines[0]  # an earlier test's run_cli left on a closed capture stream)


def _snapshot(root):
    return {p: p.stat().st_mtime_ns for p in Path(root).rglob("*") if p.is_file()}


@pytest.fixture
def taken_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # another job's rendezvous store
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return dict(env, **extra)


def test_a_taken_master_port_names_the_port_and_the_flag(world, taken_port, monkeypatch, capsys, no_dist_left):
    from recipes import distill_glue

    tmp, data, teacher, ds = world
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(taken_port))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = _snapshot(tmp)
    assert distill_glue.main(_argv(data, teacher, ds, tmp / "out", "--no_progress")) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"master port {taken_port} on 127.0.0.1 is taken" in line and "--master_port" in line, line
    assert "MASTER_PORT=" in line and len(line) < 250
    assert not (tmp / "out").exists() and _snapshot(tmp) == before


def test_a_taken_master_port_through_the_deepspeed_launcher(world, taken_port):
    tmp, data, teacher, ds = world
    recipe = [str(ROOT / "recipes" / "distill_glue.py"), *_argv(data, teacher, ds, tmp / "out", "--no_progress")]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(taken_port)]
    res = subprocess.run(cmd + recipe, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode != 0
    line = _one_line(res.stderr)
    assert f"master port {taken_port}" in line and "deepspeed --master_port" in line, line
    assert "EADDRINUSE" not in res.stdout + res.stderr and not (tmp / "out").exists()


def test_a_damaged_cache_names_the_flag_that_rebuilds_it(world, capsys, no_dist_left):
    from recipes import distill_glue

    tmp, data, teacher, ds = world
    cache = tmp / "cache"
    args = ["--teacher_cache", str(cache), "--method", "ad2-dkd", "--w_hidden", "1"]
    assert distill_glue.main(_argv(data, teacher, ds, tmp / "a", *args)) == 0
    bars = capsys.readouterr().err  # the progress line of each phase, labelled by what it does
    assert "teacher cache:" in bars and "distill:" in bars and "eval:" in bars
    assert "loss=" in bars and "ada=" in bars and "ce=" not in bars

    tokens = np.fromfile(cache / "shard-00000.tokens.bin", np.int64)
    with open(cache / "shard-00000.hidden.bin", "r+b") as f:  # one flipped byte in a row's hidden states
        f.seek(int(tokens[3]) * 4 + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    before = _snapshot(tmp)
    assert distill_glue.main(_argv(data, teacher, ds, tmp / "b", "--no_progress", *args)) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("error: --teacher_cache corrupted cache in") and "fails its crc32 check" in line, line
    assert f"rerun with --rebuild_teacher_cache to build it anew, or delete {cache}" in line, line
    assert "build_teacher_cache(" not in line  # the Python API's way out is not the command line's
    assert not (tmp / "b").exists() and _snapshot(tmp) == before  # the cache, the first run: as they were

    with open(cache / "shard-00000.logits.bin", "r+b") as f:  # a truncated shard: refused the same way
        f.truncate(8)
    assert distill_glue.main(_argv(data, teacher, ds, tmp / "b", "--no_progress", *args)) == 2
    line = _one_line(capsys.readouterr().err)
    assert (
        "damaged cache" in line and "shard-00000.logits.bin has 8 bytes" in line and "--rebuild_teacher_cache" in line
    )

    rebuild = [*args, "--rebuild_teacher_cache"]
    assert distill_glue.main(_argv(data, teacher, ds, tmp / "b", "--no_progress", *rebuild)) == 0
    a, b = (json.loads((tmp / run / "results.json").read_text()) for run in "ab")
    assert a["history"] == b["history"]  # rebuilt: the same teacher outputs, the same run
    with pytest.raises(ValueError, match="rebuild_teacher_cache"):  # the flag without a cache to rebuild
        distill_glue.parse_args(_argv(data, teacher, ds, tmp / "c", "--rebuild_teacher_cache"))


def _own(tmp, train_text: str, suffix: str):
    d = tmp / "own"
    d.mkdir(exist_ok=True)
    (d / f"train{suffix}").write_text(train_text)
    rows = [("good movie", "pos"), ("bad movie", "neg")]
    if suffix == ".csv":
        dev = "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows)
    else:
        dev = "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows)
    (d / f"dev{suffix}").write_text(dev)
    return d / f"train{suffix}", d / f"dev{suffix}"


GOOD = [("good fun", "pos"), ("awful plot", "neg"), ("great acting", "pos"), ("boring film", "neg")]
BAD_DATA = {
    "a ragged csv row": (
        ".csv",
        "text,label\ngood fun,pos\nawful plot,neg\nthe plot, sadly, is thin,neg\ngreat acting,pos\n",
        "train.csv line 4 has 4 fields, the header has 2",
    ),
    "a broken JSON line": (
        ".jsonl",
        "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in GOOD[:2])
        + '{"text": "great acting", "label": "pos"\n'
        + json.dumps({"text": "boring film", "label": "neg"})
        + "\n",
        "train.jsonl line 3 is not valid JSON",
    ),
    "an empty text": (
        ".csv",
        "text,label\ngood fun,pos\n   ,neg\ngreat acting,pos\n,neg\n",
        "example 2 (and 1 more) has an empty 'text'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_own_data_names_the_file_and_the_line(world, case, capsys, no_dist_left):
    from recipes import distill_glue

    tmp, _, teacher, ds = world
    suffix, text, expected = BAD_DATA[case]
    train, dev = _own(tmp, text, suffix)
    argv = ["--deepspeed", str(ds), "--train_file", str(train), "--validation_file", str(dev), "--teacher",
            str(teacher), "--student_layers", "bottom:1", "--output_dir", str(tmp / "o"), "--no_progress"]  # fmt: skip
    before = _snapshot(tmp)
    assert distill_glue.main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert expected in line and str(train) in line, line
    assert not (tmp / "o").exists() and _snapshot(tmp) == before
