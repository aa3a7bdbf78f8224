"""Two nodes on one machine through DeepSpeed's own launcher: ``deepspeed --hostfile H --no_ssh --node_rank R
--master_addr 127.0.0.1`` once per node rank, started together (as a scheduler starts one launcher per node), each
with one local rank, running ``recipes/distill_glue.py`` co-located and hosted (``--teacher_ranks 0``)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ad2_ds.dist import find_free_port

from conftest import save_tiny_teacher, write_ds_config, write_glue_fixture

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from conftest import SPECIAL, WORDS

    tmp = tmp_path_factory.mktemp("multinode")
    (tmp / "vocab.txt").write_text("\n".join(SPECIAL + WORDS + [chr(ord("a") + i) for i in range(26)]) + "\n")
    data = write_glue_fixture(tmp / "glue", n_train=16, n_dev=8)
    teacher = save_tiny_teacher(tmp / "teacher", tmp / "vocab.txt", layers=2)
    ds = write_ds_config(tmp / "ds.json", train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1)
    # Names only: with --no_ssh nothing connects to them; the launcher takes node R's slots from line R.
    hostfile = tmp / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    return data, teacher, ds, hostfile


def _launch_nodes(hostfile, argv_of, log_dir, timeout_s=240):
    """One ``deepspeed`` launcher per node rank, started together, node R running the recipe with ``argv_of(R)``;
    their (returncode, output) in node order. Output goes to files (a full pipe would stall a node mid-run)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    port = str(find_free_port())
    log_dir.mkdir()
    logs = [log_dir / f"launcher{r}.log" for r in range(2)]
    procs, codes = [], None
    try:
        for node_rank, log in enumerate(logs):
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                   "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", port,
                   str(ROOT / "recipes" / "distill_glue.py"), *argv_of(node_rank)]  # fmt: skip
            with open(log, "w") as f:  # a session of its own: a hung node is killed with its ranks
                procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True))  # fmt: skip
        deadline = time.monotonic() + timeout_s
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = [log.read_text() for log in logs]
    tails = "".join(f"\n--- node {r}:\n{t[-3000:]}" for r, t in enumerate(texts))
    assert codes is not None, f"the two nodes did not finish within {timeout_s} s{tails}"
    return list(zip(codes, texts))


def _argv(data, teacher, ds, out, *extra):
    return ["--deepspeed", str(ds), "--task", "sst2", "--data_dir", str(data), "--teacher", str(teacher),
            "--student_layers", "bottom:1", "--max_seq_length", "16", "--output_dir", str(out), "--no_progress",
            "--num_train_epochs", "1", "--method", "ad2", "--epsilon", "1e-3", *extra]  # fmt: skip


@pytest.mark.parametrize("layout", ["colocated", "hosted"])
def test_two_node_ranks_through_the_deepspeed_launcher(inputs, tmp_path, layout):
    """Each node writes to an output folder of its own, as on nodes without a shared file system: what lands where
    is what the README's cluster section says."""
    data, teacher, ds, hostfile = inputs
    extra = ["--teacher_ranks", "0"] if layout == "hosted" else []
    argv_of = lambda r: _argv(data, teacher, ds, tmp_path / f"node{r}", *extra)
    nodes = _launch_nodes(hostfile, argv_of, tmp_path / "logs")
    for node_rank, (rc, log) in enumerate(nodes):
        assert rc == 0, f"node {node_rank}:\n{log[-4000:]}"

    # the student group's rank 0 writes results.json and best/ once: global rank 0 co-located, node 1's rank hosted
    writer = 0 if layout == "colocated" else 1
    assert not (tmp_path / f"node{1 - writer}" / "results.json").exists()
    out = tmp_path / f"node{writer}"
    results = json.loads((out / "results.json").read_text())
    assert f"best student saved to {out / 'best'}" in nodes[writer][1]
    # 16 training examples, 4 a step on each student rank, one epoch
    if layout == "colocated":  # both ranks train: the student's ZeRO world spans the two nodes
        assert results["world_size"] == 2 and results["teacher_ranks"] == []
        assert results["engine"]["zero_stage"] == 2
        assert [h["step"] for h in results["history"]] == [2]
        # each rank saves its own ZeRO optimizer shard where it runs: resuming needs both nodes' folders in one place
        shards = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("node*/checkpoints/*/zero_pp_*"))
        assert shards == ["node0/checkpoints/global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                          "node1/checkpoints/global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # fmt: skip
    else:  # node 0's rank serves the teacher, node 1's rank is the whole student world
        assert results["world_size"] == 1 and results["teacher_ranks"] == [0] and results["teacher_load"] == "hosted"
        assert [h["step"] for h in results["history"]] == [4]
        assert not (tmp_path / "node0").exists()  # the teacher rank writes nothing
        assert "teacher rank 0 served" in nodes[0][1]
    assert results["best"]["step"] == results["history"][-1]["step"]
    assert 0 <= results["best"]["accuracy"] <= 1 and 0 <= results["teacher_scores"]["accuracy"] <= 1
    # the student is saved whole (weights and config too) where results.json is, also when global rank 0 is the teacher
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (out / "best").iterdir()}
