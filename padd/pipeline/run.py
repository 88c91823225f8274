"""`padd train`: the whole pipeline in one resumable run directory.

Steps, each skipped when its `done/<step>.json` marker exists (written last, atomically):
1. `teacher`: train the tiny teacher (cached in `run.cache_dir`) or take a local model;
2. `data`: split the problems into D_A/D_B/D_C/D_D and record them under `data/`;
3. `stage1`: teacher statistics on D_A, clustering, student construction, warmup on D_B;
4. `train`: Stages II–IV on D_C, checkpointed every `training.checkpoint_every` steps and on
   SIGINT/SIGTERM; a resumed run continues bit-identically from the last checkpoint;
5. `eval`: greedy pass@1 of the teacher, the Stage-I student and the trained student on D_D;
6. `report`: `report.md`, `report.json` and plots.

`Pipeline` owns what the steps share (the run directory, the run's inputs, the metrics log, the
device context) and hands each step function exactly what it uses. The run directory's layout is
`padd.pipeline.run_dir`'s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from padd.config import PADDRunConfig
from padd.data.splits import save_splits
from padd.pipeline import distributed as pdist
from padd.pipeline.compare import run_compare
from padd.pipeline.evaluate import evaluate_run
from padd.pipeline.inputs import RunInputs, preflight
from padd.pipeline.metrics import MetricsLogger
from padd.pipeline.report import write_report
from padd.pipeline.run_dir import STEPS, RunDir, RunDirError, read_done
from padd.pipeline.run_lock import RunDirBusy, RunDirLock
from padd.pipeline.stage1 import build_student
from padd.pipeline.teacher import ensure_teacher
from padd.pipeline.train import train_student
from padd.training.checkpointing import GracefulInterrupt, Interrupted, seed_everything

__all__ = ["STEPS", "Pipeline", "RunDirError", "make_cuda_deterministic", "read_done", "run_train"]


def make_cuda_deterministic() -> None:
    """Same seed, same run on a GPU: deterministic kernels (index_add, embedding backward, SDPA)
    and a fixed cuBLAS workspace. Ops with no deterministic version warn instead of failing."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


class Pipeline:
    """One `padd train` run; `run()` executes the steps that are not done yet.

    Creating it checks the inputs (`preflight`), locks the run directory (`RunDirBusy` while
    another run has it; `close()` frees it) and prepares it: a directory made by a different
    config is refused (or, with `force`, wiped). To read a run without writing it,
    use `RunInputs.read_only` instead.
    """

    def __init__(
        self,
        cfg: PADDRunConfig,
        *,
        force: bool = False,
        ctx: pdist.DistContext | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx or pdist.DistContext()
        self.say: Callable[[str], None] = log if self.ctx.is_main else (lambda msg: None)
        preflight(cfg)  # every file-level check before compute
        self.run_dir = RunDir(cfg.run.dir)
        self.lock = self._lock_run_dir()
        try:
            if self.ctx.is_main:
                self.run_dir.prepare(cfg, force=force)
            pdist.barrier(self.ctx)
            hf_logging.disable_progress_bar()  # per-file load/save bars drown ours
            if cfg.run.num_threads:
                torch.set_num_threads(cfg.run.num_threads)
            if cfg.run.deterministic and self.ctx.device.type == "cuda":
                make_cuda_deterministic()
            self.metrics = MetricsLogger(
                self.run_dir.metrics, tensorboard=cfg.run.tensorboard, enabled=self.ctx.is_main
            )
            self.inputs = RunInputs(
                cfg, self.run_dir, device=self.ctx.device, save_tokenizer=self.ctx.is_main
            )
        except BaseException:
            self.lock.release()
            raise

    def _lock_run_dir(self) -> RunDirLock:
        """Rank 0 takes the run directory's lock for the whole job (its ranks are one writer);
        when it cannot, every rank stops."""
        lock = RunDirLock(self.run_dir.root)
        busy: RunDirBusy | None = None
        if self.ctx.is_main:
            try:
                lock.acquire()
            except RunDirBusy as error:
                busy = error
        if not pdist.main_rank_flag(busy is None, self.ctx):
            raise busy or RunDirError("run.dir", f"{self.run_dir.root} is in use by another padd run")
        return lock

    # -- bookkeeping -----------------------------------------------------------------------------

    def _step(self, step: str, fn: Callable[[], dict[str, Any] | None], sync: bool = True) -> None:
        done = self.run_dir.is_done(step)
        if sync:  # every rank skips, or none does (`sync=False` steps run on rank 0 alone)
            done = pdist.main_rank_flag(done, self.ctx)
        if done:
            self.say(f"[padd] {step}: done already, skipped")
            return
        self.say(f"[padd] {step} ...")
        # Wall time of a step counts its interrupted attempts too (kept in `partial/`).
        before = self.run_dir.partial_wall_s(step)
        t0 = time.perf_counter()
        try:
            extra = fn() or {}
        except Interrupted:
            if self.ctx.is_main:
                self.run_dir.save_partial(step, before + time.perf_counter() - t0)
            raise
        if self.ctx.is_main:
            self.run_dir.mark_done(step, before + time.perf_counter() - t0, extra)
        if sync:
            pdist.barrier(self.ctx)

    # -- the steps -------------------------------------------------------------------------------

    def run(self, *, until: str | None = None) -> Path:
        """Run every step not done yet (up to and including `until`); returns the run directory."""
        steps = {
            "teacher": self.step_teacher,
            "data": self.step_data,
            "stage1": self.step_stage1,
            "train": self.step_train,
            "eval": self.step_eval,
            "report": self.step_report,
        }
        for name in STEPS:
            if name == "report":  # rank 0 alone; the other ranks are done
                if self.ctx.is_main:
                    self._step(name, steps[name], sync=False)
                break
            self._step(name, steps[name])
            if name == until:
                break
        return self.run_dir.root

    def close(self) -> None:
        """Close the metrics log and free the run directory (after `run()` and any `compare()`,
        which log into it too)."""
        try:
            self.metrics.close()
        finally:
            self.lock.release()

    def step_teacher(self) -> dict[str, Any]:
        path = self.inputs.teacher_path()
        if self.ctx.is_main:
            with GracefulInterrupt() as interrupt:
                info = ensure_teacher(
                    self.cfg,
                    self.inputs.tokenizer,
                    path,
                    self.inputs.problems,
                    interrupt,
                    self.metrics.log,
                )
        pdist.barrier(self.ctx)
        return {"path": str(path.resolve()), **(info if self.ctx.is_main else {})}

    def step_data(self) -> dict[str, Any]:
        splits = self.inputs.splits
        if self.ctx.is_main:
            save_splits(splits, self.inputs.problems, self.run_dir.data)
        return {"sizes": splits.sizes()}

    def step_stage1(self) -> dict[str, Any]:
        if self.ctx.is_main:
            with GracefulInterrupt() as interrupt:
                return build_student(
                    self.cfg,
                    self.inputs.load_teacher(),
                    self.inputs.tokenizer,
                    self.inputs.split("A"),
                    self.inputs.split("B"),
                    self.run_dir.stage1_student,
                    interrupt,
                    self.metrics.log,
                )
        return {}

    def step_train(self) -> dict[str, Any]:
        with GracefulInterrupt() as interrupt:
            return train_student(
                self.cfg,
                self.cfg.training.method,
                self.run_dir.train,
                interrupt,
                stage1_dir=self.run_dir.stage1_student,
                tokenizer=self.inputs.tokenizer,
                d_c=self.inputs.split("C"),
                load_teacher=self.inputs.load_teacher,
                metrics=self.metrics,
                ctx=self.ctx,
                say=self.say,
            )

    def step_eval(self) -> dict[str, Any]:
        return evaluate_run(  # every rank evaluates its share of the batches; rank 0 writes
            self.cfg,
            self.run_dir,
            tokenizer=self.inputs.tokenizer,
            problems=self.inputs.eval_problems(),
            load_teacher=self.inputs.load_teacher,
            ctx=self.ctx,
        )

    def step_report(self) -> dict[str, Any]:
        write_report(self.run_dir.root)
        return {}

    def compare(self) -> None:
        """`--compare`: the baselines and ablations of `compare.methods` (after `run()`)."""
        run_compare(self.cfg, self.run_dir, self.inputs, metrics=self.metrics, ctx=self.ctx, say=self.say)


def run_train(cfg: PADDRunConfig, *, force: bool = False, compare: bool = False) -> Path:
    """Entry point of `padd train`: single process, or one rank of a torchrun job."""
    ctx = pdist.init_from_env(cfg.distributed.backend, cfg.distributed.timeout_minutes)
    seed_everything(cfg.run.seed)
    try:
        # The pipeline lives in its own frame so that it is gone before the group is destroyed.
        return _run_pipeline(cfg, ctx, force=force, compare=compare)
    finally:
        pdist.shutdown()


def _run_pipeline(cfg: PADDRunConfig, ctx: pdist.DistContext, *, force: bool, compare: bool) -> Path:
    pipe = Pipeline(cfg, force=force, ctx=ctx)
    try:
        out = pipe.run()
        if compare:
            pipe.compare()
    finally:
        pipe.close()
    return out
