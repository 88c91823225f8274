"""Step 5: greedy pass@1 on D_D of the teacher, the Stage-I (base) student and trained students,
plus FLOPs per token and parameter counts. Each result is cached in `eval/<name>.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from padd.pipeline.checkpoint import atomic_write_json


def evaluate_model(pipe: Any, model_dir: Path | None, name: str, out_dir: Path, *, moe: bool) -> dict:
    """Evaluate one model (cached); `model_dir=None` means the teacher."""
    from padd.training.evaluation import evaluate

    out = out_dir / f"{name}.json"
    if out.exists():
        return json.loads(out.read_text())
    from padd.pipeline.inputs import load_model

    cfg = pipe.cfg
    model = (
        pipe.load_teacher()
        if model_dir is None
        else load_model(model_dir, cfg.teacher.dtype, cfg.run.experts_implementation)
    )
    control = None
    if moe:
        from padd.moe.routing_control import RoutingControl

        control = RoutingControl(model)
        control.load_selection_bias(model_dir)
    res = evaluate(
        model,
        pipe.tokenizer,
        pipe.eval_problems(),
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        control=control,
    )
    completions = res.pop("completions")
    res["samples"] = [
        {"question": p.question, "answer": p.final_answer, "completion": c}
        for p, c in list(zip(pipe.eval_problems(), completions, strict=True))[:20]
    ]
    res["params"] = sum(p.numel() for p in model.parameters())
    if model_dir is not None:  # how far from the teacher it computes, token by token
        res["kl_to_teacher"] = teacher_kl(pipe, model)
    atomic_write_json(out, res)
    if control is not None:
        control.remove()
    return res


@torch.no_grad()
def teacher_kl(pipe: Any, model: Any) -> float:
    """Mean per-token KL(teacher ‖ model) over D_D's `prompt + solution` tokens (teacher-forced;
    the model routes through whatever hooks are on it, e.g. its selection bias)."""
    from padd.pipeline.stage1 import lm_batches

    cfg = pipe.cfg
    teacher = pipe.load_teacher()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in lm_batches(pipe.eval_problems(), pipe.tokenizer, cfg.eval.batch_size, cfg.teacher.max_len):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        log_t = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), -1)
        log_s = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        # >= 0 in exact arithmetic; clamp the rounding of an (almost) exact student's ~1e-9
        kl_BS = (log_t.exp() * (log_t - log_s[..., : log_t.shape[-1]])).sum(-1).clamp_min(0.0)
        total += float(kl_BS[mask.bool()].sum())
        count += int(mask.sum())
    return total / max(count, 1)


def flops_summary(pipe: Any, student_dir: Path) -> dict:
    """FLOPs per token (analytic) and total/active parameters of teacher and student."""
    from padd import flops
    from padd.pipeline.inputs import load_model

    teacher = pipe.load_teacher()
    student = load_model(student_dir, pipe.cfg.teacher.dtype, pipe.cfg.run.experts_implementation)
    return flops.compare(teacher, student, seq_len=pipe.cfg.teacher.max_len, measured=False)


def evaluate_run(pipe: Any) -> dict[str, Any]:
    """Teacher, base student and the trained student; writes `eval/summary.json`."""
    out = pipe.dir / "eval"
    res = {
        "teacher": evaluate_model(pipe, None, "teacher", out, moe=False),
        "base_student": evaluate_model(pipe, pipe.dir / "stage1" / "student", "base_student", out, moe=True),
        pipe.cfg.training.method: evaluate_model(
            pipe, pipe.dir / "train" / "final", pipe.cfg.training.method, out, moe=True
        ),
    }
    fl = flops_summary(pipe, pipe.dir / "stage1" / "student")
    atomic_write_json(out / "flops.json", fl)
    summary = {k: v["accuracy"] for k, v in res.items()}
    atomic_write_json(out / "summary.json", summary)
    return {"accuracy": summary}
