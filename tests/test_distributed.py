"""`torchrun --nproc_per_node=2 -m padd train micro` on gloo (CPU): data sharded per rank, rollouts
per rank (with dynamic sampling), gradients averaged (DDP) or parameters sharded (FSDP2), and the
Stage IV selection bias identical on both ranks; an FSDP2 run with the reference KL resumes to
the uninterrupted result, from its last checkpoint and after a SIGTERM to torchrun."""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_runs import sigterm_once_training_starts, train_records
from safetensors.torch import load_file

from padd.config import config_from_dict
from padd.pipeline.evaluate import evaluate_model
from padd.pipeline.inputs import RunInputs

ROOT = Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "tests" / "fixtures" / "micro.yaml")  # the test-only smoke config


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_ranks_hold_the_same_stage4_bias(tmp_path, strategy):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "padd", "train", MICRO, f"run.dir={tmp_path}/run", f"run.cache_dir={tmp_path}/cache",
        "distributed.backend=gloo", f"distributed.strategy={strategy}", "training.steps=4",
        "training.prompts_per_step=4", "eval.batch_size=4",
        # Dynamic sampling (m = 2): each rank draws rollouts for 2 slots of m prompts a step.
        "training.params.dynamic_sampling=2",
        *(["--compare", "compare.methods=[vanilla_grpo]"] if strategy == "ddp" else []),
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    _assert_eval_as_one_process(tmp_path / "run", compared=["vanilla_grpo"] if strategy == "ddp" else [])
    ranks = [tmp_path / "run" / "train" / "ranks" / f"rank{r}" for r in (0, 1)]
    bias = [load_file(r / "padd_router_bias.safetensors")["selection_bias"] for r in ranks]
    assert bias[0].abs().sum() > 0  # Stage IV did move it
    torch.testing.assert_close(bias[0], bias[1], rtol=0, atol=0)
    info = [json.loads((r / "rank.json").read_text()) for r in ranks]
    assert info[0]["sharded"] == info[1]["sharded"] == (strategy == "fsdp")
    assert info[0]["weights_abs_sum"] == info[1]["weights_abs_sum"]  # same update on both ranks
    seen = [set(i["prompts_seen"]) for i in info]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # each rank had its own shard
    # 4 prompts a step, m = 2: 8 drawn, 4 each rank, of which each rank updates on 2 groups.
    assert len(info[0]["prompts_seen"]) == len(info[1]["prompts_seen"]) == 4 * 4
    recs = train_records(tmp_path / "run")
    assert [(r["prompts_sampled"], r["prompts_updated"]) for r in recs] == [(4, 2)] * 4
    assert (tmp_path / "run" / "report.md").is_file()
    # The final checkpoint is a full (gathered) HF model either way.
    final = tmp_path / "run" / "train" / "final"
    assert (final / "config.json").is_file() and list(final.glob("*.safetensors"))


def _assert_eval_as_one_process(run: Path, compared: list[str]) -> None:
    """The two ranks shared each evaluation (10 problems in batches of 4: rank 0 took batches 0
    and 2, rank 1 batch 1); the oracle is one process evaluating the same saved models."""
    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    inputs = RunInputs.read_only(cfg)
    models = {
        "teacher": (None, run / "eval" / "teacher.json"),
        "base_student": (run / "stage1" / "student", run / "eval" / "base_student.json"),
        "padd": (run / "train" / "final", run / "eval" / "padd.json"),
        **{m: (run / "compare" / m / "final", run / "compare" / m / "eval.json") for m in compared},
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1)
    try:
        for name, (model_dir, result) in models.items():
            with tempfile.TemporaryDirectory() as tmp:
                alone = evaluate_model(
                    model_dir, name, Path(tmp), moe=model_dir is not None, cfg=cfg,
                    tokenizer=inputs.tokenizer, problems=inputs.eval_problems(),
                    load_teacher=inputs.load_teacher,
                )  # fmt: skip
            shared = json.loads(result.read_text())
            assert shared["n"] == alone["n"] == 10
            assert shared["batches_by_rank"] == [[0, 2], [1]] and "batches_by_rank" not in alone
            for key in (
                "correct",
                "samples",
                "nmi_per_layer",
                "tokens_per_expert",
                "routing_entropy",
                "kl_to_teacher",
            ):
                assert shared.get(key) == alone.get(key), (name, key)
    finally:
        torch.set_num_threads(threads)


# FSDP2 with the reference KL (β > 0), one uninterrupted run shared by the resume tests below.
FSDP_BETA = [
    "distributed.backend=gloo", "distributed.strategy=fsdp", "training.steps=6",
    "training.checkpoint_every=4", "training.prompts_per_step=4", "training.params.beta=0.1",
    "run.progress=false",
]  # fmt: skip


def _torchrun(run_dir: Path, cache: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "padd", "train", MICRO, f"run.dir={run_dir}", f"run.cache_dir={cache}", *FSDP_BETA,
    ]  # fmt: skip


def _train(run_dir: Path, cache: Path) -> str:
    out = subprocess.run(_torchrun(run_dir, cache), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def _assert_same_final_weights(a: Path, b: Path) -> None:
    final = [load_file(d / "train" / "final" / "model.safetensors") for d in (a, b)]
    assert final[0].keys() == final[1].keys()
    for name in final[0]:
        torch.testing.assert_close(final[0][name], final[1][name], rtol=0, atol=0)


@pytest.fixture(scope="module")
def fsdp_beta_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp_beta")
    _train(base / "full", base / "cache")
    steps = train_records(base / "full")
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert steps[-1]["ref_kl"] > 0  # the student has left its (sharded) reference
    return base


def test_fsdp_run_with_a_reference_kl_resumes_from_its_last_checkpoint(fsdp_beta_run):
    """The run stopped after its step-4 checkpoint (training and all after undone) resumes to the
    same metrics and final weights."""
    full, cut = fsdp_beta_run / "full", fsdp_beta_run / "cut"
    shutil.copytree(full, cut)
    for name in ("train", "eval", "report"):
        (cut / "done" / f"{name}.json").unlink()
    shutil.rmtree(cut / "train" / "final")
    assert (cut / "train" / "ckpt" / "step_000004").is_dir()
    assert "resuming from step_000004" in _train(cut, fsdp_beta_run / "cache")
    assert train_records(cut) == train_records(full)
    _assert_same_final_weights(full, cut)


def test_sigterm_to_torchrun_checkpoints_every_rank_then_resumes(fsdp_beta_run):
    """SIGTERM to torchrun mid-training: it forwards the signal, the ranks agree to stop, write
    one checkpoint and exit; the same command resumes to the uninterrupted run's result."""
    run, cache = fsdp_beta_run / "interrupted", fsdp_beta_run / "cache"
    proc = subprocess.Popen(
        _torchrun(run, cache), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    err = sigterm_once_training_starts(proc, run, timeout_s=300)
    assert proc.returncode != 0
    assert err.count("checkpoint written") == 2, err[:6000]  # one line per rank
    assert not (run / "done" / "train.json").exists()
    assert (run / "train" / "ckpt" / "latest").is_file()
    assert 1 <= len(train_records(run)) < 6

    assert "resuming from step_" in _train(run, cache)
    assert train_records(run) == train_records(fsdp_beta_run / "full")
    _assert_same_final_weights(fsdp_beta_run / "full", run)
