"""`padd train CONFIG --compare`: the baselines and ablations on the same data, teacher and seeds.

Training-phase methods (`vanilla_grpo`, `online_kd`, `rspo`, `no_stage2/3/4`, any `padd.training`
preset) start from the run's Stage-I student. `teacher_grpo` trains the dense teacher itself with
the same loop, steps, learning rate and data (the paper's "Teacher (GRPO)" row); `teacher_sft`
gives the dense teacher the Stage I warmup's data and schedule (LM on D_B) and nothing else, the
control for how much of a student's gain is that data. Stage-I
ablations (`padd.config.STAGE1_ABLATIONS`) build their own student: `no_stage1` (no clustering,
no router fit, no warmup: sparse upcycling with a random router), `cluster_init` (the earlier
importance-filled construction, not function-preserving), `upcycle` (sparse upcycling, warmed up)
and `random_split` (random neuron split), each then trained with the run's method. These
constructions are not user settings (`student.init` is `exact` or `cluster`): they lost.
Results land in `compare/<method>/` and in the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from padd.config import PADDRunConfig
from padd.pipeline import distributed as pdist
from padd.pipeline.distributed import DistContext
from padd.pipeline.evaluate import evaluate_model
from padd.pipeline.inputs import RunInputs
from padd.pipeline.methods import DENSE_SFT_METHOD, DENSE_TEACHER_METHOD, STAGE1_ABLATIONS
from padd.pipeline.metrics import MetricsLogger
from padd.pipeline.report import write_report
from padd.pipeline.run_dir import CompareDir, RunDir
from padd.pipeline.stage1 import build_student, supervised_warmup_dense
from padd.pipeline.train import train_student
from padd.training.checkpointing import GracefulInterrupt, atomic_dir, seed_everything


def run_compare(
    cfg: PADDRunConfig,
    run_dir: RunDir,
    inputs: RunInputs,
    *,
    metrics: MetricsLogger,
    ctx: DistContext,
    say: Callable[[str], None],
) -> None:
    """Train and evaluate every `compare.methods` entry not done yet into `compare/<method>/`
    (on every rank: training is data parallel), then rebuild the report on rank 0."""
    for method in cfg.compare.methods:
        out = run_dir.compare(method)
        if pdist.main_rank_flag(out.result.exists(), ctx):  # rank 0 writes it: its view decides
            say(f"[padd] compare {method}: done already, skipped")
            continue
        say(f"[padd] compare {method} ...")
        t0 = time.perf_counter()
        train_method, stage1_dir = method, run_dir.stage1_student
        if method == DENSE_SFT_METHOD:
            if ctx.is_main:
                _run_teacher_sft(cfg, out, t0, inputs, metrics)
            continue
        if method in STAGE1_ABLATIONS:
            train_method = cfg.training.method
            stage1_dir = out.stage1
            ablation = STAGE1_ABLATIONS[method]
            if ctx.is_main and not stage1_dir.exists():
                with GracefulInterrupt() as interrupt:
                    build_student(
                        cfg, inputs.load_teacher(), inputs.tokenizer, inputs.split("A"), inputs.split("B"),
                        stage1_dir, interrupt, metrics.log,
                        warmup_experts=ablation.warmup, init=ablation.init,
                    )  # fmt: skip
            pdist.barrier(ctx)  # every rank loads that student next
        with GracefulInterrupt() as interrupt:
            train_student(
                cfg,
                train_method,
                out,
                interrupt,
                stage1_dir=stage1_dir,
                tokenizer=inputs.tokenizer,
                d_c=inputs.split("C"),
                load_teacher=inputs.load_teacher,
                metrics=metrics,
                ctx=ctx,
                say=say,
                stage_name=f"compare/{method}",
            )
        evaluate_model(  # every rank evaluates its share; rank 0 writes `out.result`, the done mark
            out.final,
            "eval",
            out.root,
            moe=method != DENSE_TEACHER_METHOD,
            cfg=cfg,
            tokenizer=inputs.tokenizer,
            problems=inputs.eval_problems(),
            load_teacher=inputs.load_teacher,
            ctx=ctx,
            wall_since=t0,
        )
    if ctx.is_main:
        write_report(run_dir.root)


def _run_teacher_sft(
    cfg: PADDRunConfig, out: CompareDir, t0: float, inputs: RunInputs, metrics: MetricsLogger
) -> None:
    """`teacher_sft`: the dense teacher after the Stage I warmup's supervised steps on D_B."""
    seed_everything(cfg.run.seed)
    model = inputs.load_teacher()
    tokenizer = inputs.tokenizer
    log = lambda rec: metrics.log({**rec, "stage": f"compare/{DENSE_SFT_METHOD}"})
    supervised_warmup_dense(cfg, model, tokenizer, inputs.split("B"), log)
    atomic_dir(out.final, lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)))
    evaluate_model(
        out.final,
        "eval",
        out.root,
        moe=False,
        cfg=cfg,
        tokenizer=tokenizer,
        problems=inputs.eval_problems(),
        load_teacher=inputs.load_teacher,
        wall_since=t0,
    )
