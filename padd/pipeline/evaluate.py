"""Step 5: greedy pass@1 on D_D of the teacher, the Stage-I (base) student and trained students,
plus FLOPs per token and parameter counts. Each result is cached in `eval/<name>.json`."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from padd import flops
from padd.config import PADDRunConfig
from padd.data.problem import Problem
from padd.moe.routing_control import RoutingControl
from padd.pipeline import distributed as pdist
from padd.pipeline.distributed import SINGLE_PROCESS, DistContext
from padd.pipeline.inputs import TeacherLoader, load_model
from padd.pipeline.run_dir import RunDir
from padd.pipeline.teacher import encode_sft_batch
from padd.training.checkpointing import atomic_write_json
from padd.training.evaluation import batch_of, evaluate_batches, num_batches, summarise


def evaluate_model(
    model_dir: Path | None,
    name: str,
    out_dir: Path,
    *,
    moe: bool,
    cfg: PADDRunConfig,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    load_teacher: TeacherLoader,
    ctx: DistContext = SINGLE_PROCESS,
    wall_since: float | None = None,
) -> dict[str, Any]:
    """Evaluate one model on `problems` (the run's D_D), cached in `out_dir/<name>.json`;
    `model_dir=None` means the teacher. `moe`: the model has a selection bias to route with.
    `wall_since`: a `time.perf_counter()` reading; the result then records `wall_s`, the seconds
    since it (a compared method's training and evaluation), in the one write of the file.

    Every rank of `ctx` must call it: each evaluates its share of the batches, and rank 0 merges
    them in batch order (the same result as one process), writes the file and returns the result;
    the other ranks return {}."""
    out = out_dir / f"{name}.json"
    if pdist.main_rank_flag(out.exists(), ctx):  # rank 0 writes it: its view decides
        return json.loads(out.read_text()) if ctx.is_main else {}
    teacher = load_teacher()
    # A student runs where the teacher loader puts models (the run's device), beside its teacher.
    device = next(teacher.parameters()).device
    model = (
        teacher
        if model_dir is None
        else load_model(model_dir, cfg.teacher.dtype, cfg.run.experts_implementation).to(device)
    )
    control = None
    if moe:
        control = RoutingControl(model)
        control.load_selection_bias(model_dir)
    mine = pdist.shard(range(num_batches(len(problems), cfg.eval.batch_size)), ctx)
    outcomes = evaluate_batches(
        model,
        tokenizer,
        problems,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        control=control,
        indices=mine,
        progress=f"eval {name}" if cfg.run.progress and ctx.is_main else None,
    )
    kl_parts = None
    if model_dir is not None:  # how far from the teacher it computes, token by token
        kl_parts = teacher_kl_batches(
            teacher,
            model,
            problems,
            tokenizer,
            batch_size=cfg.eval.batch_size,
            max_len=cfg.teacher.max_len,
            indices=mine,
        )
    if control is not None:
        control.remove()
    gathered = pdist.gather_to_main((outcomes, kl_parts), ctx)
    if gathered is None:
        return {}
    res = summarise(problems, [o for part, _ in gathered for o in part])
    completions = res.pop("completions")
    # Every problem's outcome, "1"/"0" in D_D order: two models' paired difference (which problems
    # one gets and the other does not) is exact, where their accuracies differ by noise.
    res["correct"] = "".join("1" if ok else "0" for ok in res.pop("correct"))
    res["samples"] = [
        {"question": p.question, "answer": p.final_answer, "completion": c}
        for p, c in list(zip(problems, completions, strict=True))[:20]
    ]
    res["params"] = sum(p.numel() for p in model.parameters())
    if model_dir is not None:
        res["kl_to_teacher"] = mean_kl([kl for _, part in gathered for kl in part])
    if ctx.enabled:  # who evaluated what, read from what each rank sent
        res["batches_by_rank"] = [[o.index for o in part] for part, _ in gathered]
    if wall_since is not None:
        res["wall_s"] = time.perf_counter() - wall_since
    atomic_write_json(out, res)
    return res


@torch.no_grad()
def teacher_kl_batches(
    teacher: PreTrainedModel,
    model: PreTrainedModel,
    problems: Sequence[Problem],
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    max_len: int,
    indices: Sequence[int] | None = None,
) -> list[tuple[int, float, int]]:
    """(batch index, summed per-token KL(teacher ‖ model), token count) of the batches `indices`
    (default: all) of `problems`' `prompt + solution` tokens (teacher-forced; the model routes
    through whatever hooks are on it, e.g. its selection bias). `mean_kl` merges them."""
    device = next(model.parameters()).device
    indices = range(num_batches(len(problems), batch_size)) if indices is None else indices
    parts = []
    for i in indices:  # batch i as `evaluate_batches` cuts it; only this rank's are encoded
        batch = encode_sft_batch(batch_of(problems, i, batch_size), tokenizer, max_len)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        log_t = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), -1)
        log_s = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        # >= 0 in exact arithmetic; clamp the rounding of an (almost) exact student's ~1e-9
        kl_BS = (log_t.exp() * (log_t - log_s[..., : log_t.shape[-1]])).sum(-1).clamp_min(0.0)
        parts.append((i, float(kl_BS[mask.bool()].sum()), int(mask.sum())))
    return parts


def mean_kl(parts: Sequence[tuple[int, float, int]]) -> float:
    """The mean per-token KL of `teacher_kl_batches` parts, summed in batch order (so the same
    float whichever ranks computed them)."""
    total, count = 0.0, 0
    for _, kl_sum, n in sorted(parts):
        total += kl_sum
        count += n
    return total / max(count, 1)


def flops_summary(teacher: PreTrainedModel, student_path: str | Path, seq_len: int) -> dict[str, Any]:
    """FLOPs per token (analytic) and total/active parameters of teacher and student.

    The student is counted on the `meta` device from its saved config: no weights are read, since
    a real student holds N/k times its teacher's FFN parameters and only their shapes matter."""
    student = flops.meta_model(AutoConfig.from_pretrained(str(student_path)))
    return flops.compare(teacher, student, seq_len=seq_len, measured=False)


def evaluate_run(
    cfg: PADDRunConfig,
    run_dir: RunDir,
    *,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    load_teacher: TeacherLoader,
    ctx: DistContext = SINGLE_PROCESS,
) -> dict[str, Any]:
    """Teacher, base student and the trained student on `problems` (the run's D_D); writes
    `eval/<name>.json`, `eval/flops.json` and `eval/summary.json`. Every rank of `ctx` calls it
    and shares the batches (`evaluate_model`); rank 0 writes and returns the summary, the other
    ranks {}."""
    out = run_dir.eval
    # One teacher for all three evaluations and the FLOPs count (none of them changes it), loaded
    # only if some result is not cached yet.
    load_teacher = functools.cache(load_teacher)
    common = dict(cfg=cfg, tokenizer=tokenizer, problems=problems, load_teacher=load_teacher, ctx=ctx)
    res = {
        "teacher": evaluate_model(None, "teacher", out, moe=False, **common),
        "base_student": evaluate_model(run_dir.stage1_student, "base_student", out, moe=True, **common),
        cfg.training.method: evaluate_model(
            run_dir.train.final, cfg.training.method, out, moe=True, **common
        ),
    }
    if not ctx.is_main:
        return {}
    student = run_dir.stage1_student
    fl = flops_summary(load_teacher(), student, cfg.teacher.max_len)
    atomic_write_json(run_dir.eval_flops, fl)
    summary = {k: v["accuracy"] for k, v in res.items()}
    atomic_write_json(run_dir.eval_summary, summary)
    return {"accuracy": summary}
