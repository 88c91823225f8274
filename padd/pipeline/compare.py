"""`padd train CONFIG --compare`: the baselines and ablations on the same data, teacher and seeds.

Training-phase methods (`vanilla_grpo`, `online_kd`, `rspo`, `no_stage2/3/4`, any `padd.training`
preset) start from the run's Stage-I student. `teacher_grpo` trains the dense teacher itself with
the same loop, steps, learning rate and data (the paper's "Teacher (GRPO)" row); `teacher_sft`
gives the dense teacher the Stage I warmup's data and schedule (LM on D_B) and nothing else, the
control for how much of a student's gain is that data. Stage-I
ablations build their own student: `no_stage1` (no clustering, no router fit, no warmup: sparse
upcycling with a random router), `cluster_init` (the earlier importance-filled construction, not
function-preserving), `upcycle` (sparse upcycling, warmed up) and `random_split` (random neuron
split), each then trained with the run's method. Results land in `compare/<method>/` and in the
report.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from padd.pipeline.checkpoint import GracefulInterrupt, atomic_write_json, seed_everything
from padd.pipeline.methods import DENSE_SFT_METHOD, DENSE_TEACHER_METHOD, STAGE1_ABLATIONS


def run_compare(pipe: Any) -> None:
    from padd.pipeline.evaluate import evaluate_model
    from padd.pipeline.report import write_report
    from padd.pipeline.stage1 import build_student
    from padd.pipeline.train import train_student

    cfg = pipe.cfg
    for method in cfg.compare.methods:
        out = pipe.dir / "compare" / method
        if (out / "eval.json").exists():
            pipe.say(f"[padd] compare {method}: done already, skipped")
            continue
        pipe.say(f"[padd] compare {method} ...")
        t0 = time.perf_counter()
        train_method, stage1_dir = method, None
        if method == DENSE_SFT_METHOD:
            if pipe.ctx.is_main:
                _run_teacher_sft(pipe, out, t0)
            continue
        if method in STAGE1_ABLATIONS:
            train_method = cfg.training.method
            stage1_dir = out / "stage1"
            change = STAGE1_ABLATIONS[method]
            s1 = dataclasses.replace(cfg.stage1, skip=change.get("skip", cfg.stage1.skip))
            st = dataclasses.replace(cfg.student, init=change.get("init", cfg.student.init))
            sub = dataclasses.replace(cfg, stage1=s1, student=st)
            if pipe.ctx.is_main and not stage1_dir.exists():
                with GracefulInterrupt() as interrupt:
                    build_student(
                        sub, pipe.load_teacher(), pipe.tokenizer, pipe.split("A"), pipe.split("B"),
                        stage1_dir, interrupt, pipe.metrics.log,
                    )  # fmt: skip
        with GracefulInterrupt() as interrupt:
            train_student(
                pipe, train_method, out, interrupt, stage1_dir=stage1_dir, stage_name=f"compare/{method}"
            )
        if pipe.ctx.is_main:
            res = evaluate_model(pipe, out / "final", "eval", out, moe=method != DENSE_TEACHER_METHOD)
            res["wall_s"] = time.perf_counter() - t0
            atomic_write_json(out / "eval.json", res)
    if pipe.ctx.is_main:
        write_report(pipe.dir)


def _run_teacher_sft(pipe: Any, out: Any, t0: float) -> None:
    """`teacher_sft`: the dense teacher after the Stage I warmup's supervised steps on D_B."""
    from padd.pipeline.checkpoint import atomic_dir
    from padd.pipeline.evaluate import evaluate_model
    from padd.pipeline.stage1 import supervised_warmup_dense

    seed_everything(pipe.cfg.run.seed)
    model = pipe.load_teacher()
    log = lambda rec: pipe.metrics.log({**rec, "stage": f"compare/{DENSE_SFT_METHOD}"})
    supervised_warmup_dense(pipe.cfg, model, pipe.tokenizer, pipe.split("B"), log)
    atomic_dir(out / "final", lambda d: (model.save_pretrained(d), pipe.tokenizer.save_pretrained(d)))
    res = evaluate_model(pipe, out / "final", "eval", out, moe=False)
    res["wall_s"] = time.perf_counter() - t0
    atomic_write_json(out / "eval.json", res)
