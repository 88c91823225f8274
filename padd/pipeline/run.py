"""`padd train`: the whole pipeline in one resumable run directory.

Steps, each skipped when its `done/<step>.json` marker exists (written last, atomically):
1. `teacher`: train the tiny teacher (cached in `run.cache_dir`) or take a local model;
2. `data`: split the problems into D_A/D_B/D_C/D_D and record them under `data/`;
3. `stage1`: teacher statistics on D_A, clustering, student construction, warmup on D_B;
4. `train`: Stages II–IV on D_C, checkpointed every `training.checkpoint_every` steps and on
   SIGINT/SIGTERM; a resumed run continues bit-identically from the last checkpoint;
5. `eval`: greedy pass@1 of the teacher, the Stage-I student and the trained student on D_D;
6. `report`: `report.md`, `report.json` and plots.

Run directory layout: `config.yaml` (resolved) + `fingerprint`, `metrics.jsonl`, `tokenizer/`,
`teacher/` (pointer to the model), `data/`, `stage1/student/`, `train/ckpt/`, `train/final/`,
`eval/*.json`, `report.md`, `report.json`, `plots/*.png`, `done/*.json`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from padd.config import PADDRunConfig
from padd.data.problem import Problem
from padd.pipeline import distributed as pdist
from padd.pipeline.checkpoint import (
    GracefulInterrupt,
    Interrupted,
    atomic_dir,
    atomic_write_json,
    seed_everything,
)
from padd.pipeline.metrics import MetricsLogger
from padd.pipeline.run_dir import STEPS, RunDir, RunDirError, read_done

__all__ = ["STEPS", "Pipeline", "RunDirError", "make_cuda_deterministic", "read_done", "run_train"]


def make_cuda_deterministic() -> None:
    """Same seed, same run on a GPU: deterministic kernels (index_add, embedding backward, SDPA)
    and a fixed cuBLAS workspace. Ops with no deterministic version warn instead of failing."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


class Pipeline:
    """One `padd train` run; `run()` executes the steps that are not done yet."""

    def __init__(
        self,
        cfg: PADDRunConfig,
        *,
        force: bool = False,
        ctx: pdist.DistContext | None = None,
        log: Callable[[str], None] = print,
    ):
        from padd.pipeline.inputs import preflight

        self.cfg = cfg
        self.ctx = ctx or pdist.DistContext()
        self.say = log if self.ctx.is_main else (lambda msg: None)
        preflight(cfg)  # every file-level check before compute
        if self.ctx.is_main:
            RunDir(cfg.run.dir).prepare(cfg, force=force)
        pdist.barrier(self.ctx)
        self.dir = Path(cfg.run.dir)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-file load/save bars drown ours
        if cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        if cfg.run.deterministic and self.ctx.device.type == "cuda":
            make_cuda_deterministic()
        self.metrics = MetricsLogger(
            self.dir / "metrics.jsonl", tensorboard=cfg.run.tensorboard, enabled=self.ctx.is_main
        )
        self._problems: list[Problem] | None = None
        self._tokenizer: Any = None

    # -- bookkeeping -----------------------------------------------------------------------------

    def done(self, step: str) -> bool:
        return (self.dir / "done" / f"{step}.json").exists()

    def _mark(self, step: str, seconds: float, **extra: Any) -> None:
        if self.ctx.is_main:
            atomic_write_json(self.dir / "done" / f"{step}.json", {"wall_s": seconds, **extra})

    def _step(self, step: str, fn: Callable[[], dict[str, Any] | None], sync: bool = True) -> None:
        if self.done(step):
            self.say(f"[padd] {step}: done already, skipped")
            return
        self.say(f"[padd] {step} ...")
        # Wall time of a step counts its interrupted attempts too (kept in `partial/`).
        partial = self.dir / "partial" / f"{step}.json"
        before = json.loads(partial.read_text())["wall_s"] if partial.exists() else 0.0
        t0 = time.perf_counter()
        try:
            extra = fn() or {}
        except Interrupted:
            if self.ctx.is_main:
                atomic_write_json(partial, {"wall_s": before + time.perf_counter() - t0})
            raise
        self._mark(step, before + time.perf_counter() - t0, **extra)
        if sync:
            pdist.barrier(self.ctx)

    @property
    def problems(self) -> list[Problem]:
        if self._problems is None:
            from padd.pipeline.inputs import load_problems

            self._problems = load_problems(self.cfg)
        return self._problems

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from padd.pipeline.inputs import build_tokenizer

            self._tokenizer = build_tokenizer(self.cfg)
            if self.ctx.is_main and not (self.dir / "tokenizer").exists():
                atomic_dir(self.dir / "tokenizer", lambda d: self._tokenizer.save_pretrained(d))
        return self._tokenizer

    def splits(self) -> Any:
        from padd.data.splits import make_splits

        s = self.cfg.data.splits
        return make_splits(self.problems, (s.a, s.b, s.c, s.d), seed=self.cfg.run.seed)

    def split(self, name: str) -> list[Problem]:
        return self.splits().take(self.problems, name)

    def eval_problems(self) -> list[Problem]:
        d = self.split("D")
        n = self.cfg.eval.num_problems
        return d[:n] if n else d

    # -- the steps -------------------------------------------------------------------------------

    def run(self, *, until: str | None = None) -> Path:
        """Run every step not done yet (up to and including `until`)."""
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
        self.metrics.close()
        return self.dir

    def teacher_path(self) -> Path:
        if self.cfg.teacher.source == "pretrained":
            return Path(self.cfg.teacher.path)
        from padd.pipeline.teacher import teacher_cache_key

        return Path(self.cfg.run.cache_dir) / "teachers" / teacher_cache_key(self.cfg)

    def step_teacher(self) -> dict[str, Any]:
        from padd.pipeline.teacher import ensure_teacher

        path = self.teacher_path()
        if self.ctx.is_main:
            with GracefulInterrupt() as interrupt:
                info = ensure_teacher(
                    self.cfg, self.tokenizer, path, self.problems, interrupt, self.metrics.log
                )
        pdist.barrier(self.ctx)
        return {"path": str(path.resolve()), **(info if self.ctx.is_main else {})}

    def step_data(self) -> dict[str, Any]:
        from padd.data.splits import save_splits

        splits = self.splits()
        if self.ctx.is_main:
            save_splits(splits, self.problems, self.dir / "data")
        return {"sizes": splits.sizes()}

    def load_teacher(self) -> Any:
        from padd.pipeline.inputs import load_model

        return load_model(
            self.teacher_path(), self.cfg.teacher.dtype, self.cfg.run.experts_implementation
        ).to(self.ctx.device)

    def step_stage1(self) -> dict[str, Any]:
        from padd.pipeline.stage1 import build_student

        if self.ctx.is_main:
            with GracefulInterrupt() as interrupt:
                return build_student(
                    self.cfg,
                    self.load_teacher(),
                    self.tokenizer,
                    self.split("A"),
                    self.split("B"),
                    self.dir / "stage1" / "student",
                    interrupt,
                    self.metrics.log,
                )
        return {}

    def step_train(self) -> dict[str, Any]:
        from padd.pipeline.train import train_student

        with GracefulInterrupt() as interrupt:
            return train_student(self, self.cfg.training.method, self.dir / "train", interrupt)

    def step_eval(self) -> dict[str, Any]:
        from padd.pipeline.evaluate import evaluate_run

        if self.ctx.is_main:
            return evaluate_run(self)
        return {}

    def step_report(self) -> dict[str, Any]:
        from padd.pipeline.report import write_report

        write_report(self.dir)
        return {}


def train_batches(problems: list[Problem], per_step: int, seed: int, start: int) -> Iterator[list[Problem]]:
    """The prompts of each step from `start` on: epochs of seeded permutations, a pure function of
    the step index (a resumed run draws exactly the batches of an uninterrupted one)."""
    n = len(problems)
    step = start
    while True:
        batch = []
        for j in range(step * per_step, (step + 1) * per_step):
            epoch, pos = divmod(j, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            batch.append(problems[int(perm[pos])])
        yield batch
        step += 1


def run_train(cfg: PADDRunConfig, *, force: bool = False, compare: bool = False) -> Path:
    """Entry point of `padd train`: single process, or one rank of a torchrun job."""
    ctx = pdist.init_from_env(cfg.distributed.backend)
    seed_everything(cfg.run.seed)
    try:
        pipe = Pipeline(cfg, force=force, ctx=ctx)
        out = pipe.run()
        if compare:
            from padd.pipeline.compare import run_compare

            run_compare(pipe)
        return out
    except Interrupted:
        raise
    finally:
        pdist.shutdown()
