"""Step 4, Stages II–IV: `PADDTrainer` over D_C, checkpointed and resumable.

Checkpoints are `train/ckpt/step_N/` (student weights, selection bias, optimiser, EMA, step, RNG;
`padd.training.checkpointing`), each written to a temp folder and renamed into place. The
final student goes to `train/final/`. Metrics logged after the last checkpoint are dropped on
resume, so `metrics.jsonl` holds every step exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from padd.config import PADDRunConfig
from padd.data.problem import Problem
from padd.decompress.sequence_targets import SequenceRouterTargets
from padd.moe.router_groups import TiedRouterGroups
from padd.moe.routing_control import RoutingControl
from padd.pipeline import distributed as pdist
from padd.pipeline.inputs import TeacherLoader, load_model
from padd.pipeline.methods import DENSE_TEACHER_METHOD, run_router_weight, training_config
from padd.pipeline.metrics import MetricsLogger
from padd.pipeline.run_dir import TrainDir
from padd.training.checkpointing import (
    CheckpointDir,
    GracefulInterrupt,
    Interrupted,
    atomic_dir,
    atomic_write_json,
)
from padd.training.prompts import prompt_batches
from padd.training.trainer import PADDTrainer, frozen_reference


def train_student(
    cfg: PADDRunConfig,
    method: str,
    out: TrainDir,
    interrupt: GracefulInterrupt,
    *,
    stage1_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    d_c: Sequence[Problem],
    load_teacher: TeacherLoader,
    metrics: MetricsLogger,
    ctx: pdist.DistContext,
    say: Callable[[str], None],
    stage_name: str = "train",
) -> dict[str, Any]:
    """Train the Stage-I student in `stage1_dir` (the teacher itself for `teacher_grpo`) with
    `method` on the prompts of `d_c` into `out.final`; resumes from `out.ckpt`.

    `metrics` gets one record per step, tagged `stage_name`; `say` prints progress lines (a no-op
    on ranks other than 0). Returns what the step's `done` marker records.
    """
    tcfg = cfg.training
    if method == DENSE_TEACHER_METHOD:  # the paper's "Teacher (GRPO)" row: the same loop, dense
        student, control, targets = load_teacher(), None, None
    else:
        student = load_model(stage1_dir, cfg.teacher.dtype, cfg.run.experts_implementation).to(ctx.device)
        control = RoutingControl(student)
        control.load_selection_bias(stage1_dir)
        targets = SequenceRouterTargets.load(stage1_dir)
        if targets is not None:
            targets = targets.with_xi(cfg.router.xi)
    tied = TiedRouterGroups(student)  # a no-op unless the student's router rows are tied
    pcfg = training_config(method, tcfg.params, cfg.run.seed, run_router_weight(cfg) if targets else 0.0)
    needs_teacher = pcfg.use_kd or (pcfg.router_weight > 0 and targets is not None)
    teacher = load_teacher() if needs_teacher else None
    sharded = ctx.enabled and pdist.should_shard(student, cfg.distributed.strategy, ctx)
    reference = None
    if sharded:
        if pcfg.beta > 0:  # copied before sharding (FSDP2 modules refuse a deep copy), sharded alike
            reference = pdist.apply_fsdp2(frozen_reference(student))
        pdist.apply_fsdp2(student)
    trainer = PADDTrainer(
        student,
        teacher,
        tokenizer,
        pcfg,
        control,
        router_targets=targets,
        reference=reference,
        # sharded: checkpoints gather full states on rank 0; resume scatters them back
        state_io=pdist.ShardedStateIO() if sharded else None,
    )
    if not sharded:  # FSDP2 reduce-scatters gradients itself
        pdist.average_gradients_before_step(trainer.optimizer, ctx)

    ckpts = CheckpointDir(out.ckpt)
    start = 0
    latest = ckpts.latest()
    if latest is not None:
        trainer.load_checkpoint(latest)
        start = trainer.step_count
        say(f"[padd] {stage_name}: resuming from {latest.name}")
    metrics.truncate_after(stage_name, start)

    def save(step: int) -> None:
        state = trainer.gather_checkpoint()  # every rank: a collective when sharded
        if ctx.is_main:
            ckpts.save(step, lambda d: trainer.write_checkpoint(d, state))
        pdist.barrier(ctx)

    # Dynamic sampling draws rollouts for more prompts than the update keeps (LoopParams).
    batches = prompt_batches(d_c, tcfg.prompts_per_step * pcfg.dynamic_sampling, cfg.run.seed, start)
    bar = tqdm(
        total=tcfg.steps, initial=start, desc=stage_name, disable=not (cfg.run.progress and ctx.is_main)
    )
    t0 = time.perf_counter()
    seen: list[str] = []
    for step in range(start, tcfg.steps):
        # Ranks split the step by update slot (m prompts each), so every rank's count is a
        # multiple of m whatever the world size; one process takes the batch as it is.
        m = pcfg.dynamic_sampling
        batch = next(batches)
        slots = [batch[i : i + m] for i in range(0, len(batch), m)]
        problems = [p for slot in pdist.shard(slots, ctx) for p in slot]
        seen += [p.question for p in problems]
        record = trainer.step(problems)  # Stage IV sums its counts over ranks: one bias everywhere
        done = step + 1
        metrics.log({**record, "stage": stage_name, "step": done})  # ours win over the trainer's
        bar.update(1)
        bar.set_postfix(reward=f"{record.get('reward', float('nan')):.2f}")
        stop = pdist.any_rank(interrupt.requested, ctx)
        if stop or (tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0 and done < tcfg.steps):
            save(done)
            if stop:
                raise Interrupted(interrupt.signum or 15)
    bar.close()
    seconds = time.perf_counter() - t0
    state = trainer.gather_checkpoint()
    if ctx.is_main:
        # transformers' original weight layout: the final student is for other tools too.
        atomic_dir(
            out.final,
            lambda d: (trainer.write_checkpoint(d, state, hf_layout=True), tokenizer.save_pretrained(d)),
        )
    if ctx.enabled and control is not None:  # per-rank evidence that ranks agree: bias, weights
        rank_dir = out.rank(ctx.rank)
        control.save_selection_bias(rank_dir)
        checksum = sum(float(pdist.full_tensor(p).double().abs().sum()) for p in student.parameters())
        info = {"weights_abs_sum": checksum, "prompts_seen": seen, "sharded": sharded}
        atomic_write_json(rank_dir / "rank.json", info)
    pdist.barrier(ctx)
    info = {"router_untied": tied.max_untied()}
    tied.remove()
    if control is not None:
        control.remove()
    return {**info, "method": method, "steps": tcfg.steps, "resumed_from": start, "loop_s": seconds}
