"""Step 4, Stages II–IV: `PADDTrainer` over D_C, checkpointed and resumable.

Checkpoints are `train/ckpt/step_N/` (student weights, selection bias, optimiser, EMA, step, RNG;
the trainer's own `save_checkpoint`), each written to a temp folder and renamed into place. The
final student goes to `train/final/`. Metrics logged after the last checkpoint are dropped on
resume, so `metrics.jsonl` holds every step exactly once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from padd.pipeline import distributed as pdist
from padd.pipeline.checkpoint import (
    CheckpointDir,
    GracefulInterrupt,
    Interrupted,
    atomic_dir,
    atomic_write_json,
)


def training_config(method: str, params: dict[str, Any], seed: int) -> Any:
    """The `padd.training` preset `method` with `params` on top (the run seed unless overridden)."""
    from padd.training.config import preset

    return preset(method, **{"seed": seed, **params})


def train_student(
    pipe: Any,
    method: str,
    out: Path,
    interrupt: GracefulInterrupt,
    *,
    stage1_dir: Path | None = None,
    stage_name: str = "train",
) -> dict[str, Any]:
    """Train the Stage-I student with `method` into `out/final`; resumes from `out/ckpt`."""
    from padd.moe.routing_control import RoutingControl
    from padd.pipeline.inputs import load_model
    from padd.pipeline.run import train_batches
    from padd.training.trainer import PADDTrainer

    cfg, ctx = pipe.cfg, pipe.ctx
    tcfg = cfg.training
    stage1_dir = stage1_dir or pipe.dir / "stage1" / "student"
    student = load_model(stage1_dir, cfg.teacher.dtype).to(ctx.device)
    control = RoutingControl(student)
    control.load_selection_bias(stage1_dir)
    pcfg = training_config(method, tcfg.params, cfg.run.seed)
    teacher = pipe.load_teacher() if pcfg.use_kd else None
    sharded = ctx.enabled and pdist.should_shard(student, cfg.distributed.strategy, ctx)
    if sharded:
        pdist.apply_fsdp2(student)
    trainer = PADDTrainer(student, teacher, pipe.tokenizer, pcfg, control)
    if sharded:  # checkpoints gather full states on rank 0; resume scatters them back
        trainer.state_io = pdist.ShardedStateIO()
    if not sharded:  # FSDP2 reduce-scatters gradients itself
        pdist.average_gradients_before_step(trainer.optimizer, ctx)

    ckpts = CheckpointDir(out / "ckpt")
    start = 0
    latest = ckpts.latest()
    if latest is not None:
        trainer.load_checkpoint(latest)
        start = trainer.step_count
        pipe.say(f"[padd] {stage_name}: resuming from {latest.name}")
    pipe.metrics.truncate_after(stage_name, start)

    def save(step: int) -> None:
        state = trainer.gather_checkpoint()  # every rank: a collective when sharded
        if ctx.is_main:
            ckpts.save(step, lambda d: trainer.write_checkpoint(d, state))
        pdist.barrier(ctx)

    d_c = pipe.split("C")
    batches = train_batches(d_c, tcfg.prompts_per_step, cfg.run.seed, start)
    bar = tqdm(
        total=tcfg.steps, initial=start, desc=stage_name, disable=not (cfg.run.progress and ctx.is_main)
    )
    t0 = time.perf_counter()
    seen: list[str] = []
    for step in range(start, tcfg.steps):
        problems = pdist.shard(next(batches), ctx)
        seen += [p.question for p in problems]
        metrics = trainer.step(problems)
        pdist.all_reduce_mean_(control.selection_bias, ctx)  # identical bias on every rank
        done = step + 1
        pipe.metrics.log({**metrics, "stage": stage_name, "step": done})  # ours win over the trainer's
        bar.update(1)
        bar.set_postfix(reward=f"{metrics.get('reward', float('nan')):.2f}")
        stop = pdist.any_rank(interrupt.requested, ctx)
        if stop or (tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0 and done < tcfg.steps):
            save(done)
            if stop:
                raise Interrupted(interrupt.signum or 15)
    bar.close()
    seconds = time.perf_counter() - t0
    state = trainer.gather_checkpoint()
    if ctx.is_main:
        atomic_dir(
            out / "final", lambda d: (trainer.write_checkpoint(d, state), pipe.tokenizer.save_pretrained(d))
        )
    if ctx.enabled:  # per-rank evidence that ranks agree: bias and a weight checksum
        rank_dir = out / "ranks" / f"rank{ctx.rank}"
        control.save_selection_bias(rank_dir)
        checksum = sum(float(pdist.full_tensor(p).double().abs().sum()) for p in student.parameters())
        info = {"weights_abs_sum": checksum, "prompts_seen": seen, "sharded": sharded}
        atomic_write_json(rank_dir / "rank.json", info)
    pdist.barrier(ctx)
    control.remove()
    return {"method": method, "steps": tcfg.steps, "resumed_from": start, "loop_s": seconds}
