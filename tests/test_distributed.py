"""`torchrun --nproc_per_node=2 -m padd train micro` on gloo (CPU): data sharded per rank, rollouts
per rank, gradients averaged (DDP) or parameters sharded (FSDP2), and the Stage IV selection
bias identical on both ranks."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_ranks_hold_the_same_stage4_bias(tmp_path, strategy):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "padd", "train", "micro", f"run.dir={tmp_path}/run", f"run.cache_dir={tmp_path}/cache",
        "distributed.backend=gloo", f"distributed.strategy={strategy}", "training.steps=4",
        "training.prompts_per_step=4",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = [tmp_path / "run" / "train" / "ranks" / f"rank{r}" for r in (0, 1)]
    bias = [load_file(r / "padd_router_bias.safetensors")["selection_bias"] for r in ranks]
    assert bias[0].abs().sum() > 0  # Stage IV did move it
    torch.testing.assert_close(bias[0], bias[1], rtol=0, atol=0)
    info = [json.loads((r / "rank.json").read_text()) for r in ranks]
    assert info[0]["sharded"] == info[1]["sharded"] == (strategy == "fsdp")
    assert info[0]["weights_abs_sum"] == info[1]["weights_abs_sum"]  # same update on both ranks
    seen = [set(i["prompts_seen"]) for i in info]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # each rank had its own shard
    assert (tmp_path / "run" / "report.md").is_file()
    # The final checkpoint is a full (gathered) HF model either way.
    final = tmp_path / "run" / "train" / "final"
    assert (final / "config.json").is_file() and list(final.glob("*.safetensors"))


def test_fsdp_run_with_a_reference_kl_resumes_to_the_uninterrupted_result(tmp_path):
    """β > 0 under FSDP2 through the CLI: the reference is sharded like the student, and a run
    stopped after its last checkpoint resumes to the same metrics and the same final weights."""

    def train(run_dir):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "padd", "train", "micro", f"run.dir={run_dir}", f"run.cache_dir={tmp_path}/cache",
            "distributed.backend=gloo", "distributed.strategy=fsdp", "training.steps=6",
            "training.checkpoint_every=4", "training.prompts_per_step=4", "training.params.beta=0.1",
        ]  # fmt: skip
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stderr[-4000:]
        return out.stdout

    def records(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines if x.strip()]
        return [
            {k: v for k, v in r.items() if not k.startswith("time")}
            for r in recs
            if r.get("stage") == "train"
        ]

    full = tmp_path / "full"
    train(full)
    steps = records(full)
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert steps[-1]["ref_kl"] > 0  # the student has left its (sharded) reference

    # The same run, stopped after the step-4 checkpoint: training and everything after undone.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for name in ("train", "eval", "report"):
        (cut / "done" / f"{name}.json").unlink()
    shutil.rmtree(cut / "train" / "final")
    assert (cut / "train" / "ckpt" / "step_000004").is_dir()
    assert "resuming from step_000004" in train(cut)
    assert records(cut) == steps
    final = [load_file(d / "train" / "final" / "model.safetensors") for d in (full, cut)]
    assert final[0].keys() == final[1].keys()
    for name in final[0]:
        torch.testing.assert_close(final[0][name], final[1][name], rtol=0, atol=0)
