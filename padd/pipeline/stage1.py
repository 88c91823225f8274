"""Step 3, Stage I: teacher statistics on D_A, neuron clustering, student construction (or the
pre-trained MoE student), expert warmup on D_B. Output: `stage1/student/` (HF model + tokenizer +
selection bias), written atomically."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import padd.decompress as dec
from padd.config import PADDRunConfig
from padd.data.problem import Problem
from padd.moe.hf_experts import use_experts
from padd.moe.routing_control import RoutingControl
from padd.pipeline.inputs import load_model
from padd.pipeline.teacher import encode_sft_batch
from padd.training.checkpointing import GracefulInterrupt, atomic_dir


def lm_batches(
    problems: Sequence[Problem],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    max_len: int,
    limit: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenized `prompt + solution` batches (`input_ids`, `attention_mask`, `labels`)."""
    count = 0
    for i in range(0, len(problems), batch_size):
        if limit is not None and count >= limit:
            return
        yield encode_sft_batch(problems[i : i + batch_size], tokenizer, max_len)
        count += 1


def build_student(
    cfg: PADDRunConfig,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    d_a: Sequence[Problem],
    d_b: Sequence[Problem],
    out: Path,
    interrupt: GracefulInterrupt,
    log: Callable[[dict[str, Any]], None],
    *,
    warmup_experts: bool = True,
    init: str | None = None,
) -> dict[str, Any]:
    """Stage I end to end (`warmup_experts=False`: decompression only); returns timings.

    `init` is the construction (default `student.init`); `--compare`'s Stage-I ablations pass
    theirs (`padd.config.STAGE1_ABLATIONS`).

    The student directory holds the HF model and tokenizer, the selection bias and, for a
    tied-group student (`student.init=exact`), the teacher's sequence clusters its router is
    trained towards (`padd_router_targets.safetensors`).
    """
    s1, st, rt = cfg.stage1, cfg.student, cfg.router
    max_len = cfg.teacher.max_len
    init = init or st.init
    info: dict[str, Any] = {"init": init}
    say = tqdm.write if cfg.run.progress else (lambda msg: None)
    t0 = time.perf_counter()
    stats_batches = list(lm_batches(d_a, tokenizer, s1.batch_size, max_len, s1.stats_batches))
    n = len(stats_batches)
    say(f"stage1: the teacher's FFN statistics and clusters on D_A ({n} batch{'es' if n != 1 else ''}) ...")
    stats = dec.collect_stats(
        teacher,
        stats_batches,
        num_experts=st.num_experts,
        method=dec.clustering_method(init),
        seed=cfg.run.seed,
        xi=s1.neuron_xi,
    )
    info["stats_s"] = time.perf_counter() - t0
    interrupt.check()
    t0 = time.perf_counter()
    targets = None
    if st.source == "pretrained":
        student = load_model(st.path, cfg.teacher.dtype, cfg.run.experts_implementation)
        fitted = dec.init_pretrained_student(
            student, teacher, stats_batches, xi=s1.neuron_xi, seed=cfg.run.seed
        )
        clusters = fitted.clusters
        info["router_fit_r2"] = fitted.r2
    else:
        say(f"stage1: the {init} student, {st.num_experts} experts, top-{st.top_k} ...")
        student = dec.decompress(
            teacher,
            st.num_experts,
            st.top_k,
            stats,
            init=init,
            seed=cfg.run.seed,
        )
        use_experts(student, cfg.run.experts_implementation)
        clusters = stats.clusters
        if init == "exact":
            groups = st.num_experts // st.top_k
            say("stage1: fitting its router to the teacher's sequence clusters ...")
            targets = dec.fit_sequence_targets(
                teacher, stats_batches, groups, st.top_k, xi=rt.xi, seed=cfg.run.seed
            )
            info["router_fit_agreement"] = dec.fit_group_router(student, teacher, stats_batches, targets)
    info["construct_s"] = time.perf_counter() - t0
    info["experts_implementation"] = student.config._experts_implementation
    interrupt.check()
    if s1.warmup_steps == 0 or not warmup_experts:
        info["warmup"] = "skipped"
    else:
        t0 = time.perf_counter()
        progress = cfg.run.progress
        bar = tqdm(total=s1.warmup_steps, desc="stage1 warmup", disable=not progress, dynamic_ncols=True)

        def log_step(rec: dict[str, Any]) -> None:
            log({**rec, "stage": "stage1_warmup", "step": int(rec["step"])})
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")

        history = dec.warmup(
            student,
            teacher,
            # A list, gone round as often as the steps need: the teacher's outputs on each batch
            # are computed once and reused (`warmup`'s teacher cache).
            list(lm_batches(d_b, tokenizer, s1.batch_size, max_len)),
            None if targets is not None else clusters,
            steps=s1.warmup_steps,
            lr=s1.warmup_lr,
            alpha=s1.kd_weight,
            beta=s1.init_weight,
            xi=s1.neuron_xi,
            router_targets=targets,
            routing=s1.warmup_routing,
            log=log_step,
        )
        bar.close()
        info["warmup"] = "done"
        info["warmup_steps"] = len(history)
        info["warmup_s"] = time.perf_counter() - t0
    student.eval()
    control = RoutingControl(student)

    def write(d: Path) -> None:
        student.save_pretrained(d)
        tokenizer.save_pretrained(d)
        control.save_selection_bias(d)
        if targets is not None:
            targets.save(d)

    atomic_dir(out, write)
    control.remove()
    return info


def _cycle(
    problems: Sequence[Problem], tokenizer: PreTrainedTokenizerBase, batch_size: int, max_len: int
) -> Iterator[dict]:
    # Warmup may take more steps than D_B has batches: go round again.
    while True:
        yield from lm_batches(problems, tokenizer, batch_size, max_len)


def supervised_warmup_dense(
    cfg: PADDRunConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    d_b: Sequence[Problem],
    log: Callable[[dict], None],
) -> None:
    """The Stage I warmup's data and schedule on a dense model, in place: `L_LM` on D_B's worked
    solutions, `stage1.warmup_steps` AdamW steps at `stage1.warmup_lr` (its `L_KD` to itself is 0
    and it has no router for `L_init`). The control for how much of the warmup's gain is data."""
    s1 = cfg.stage1
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s1.warmup_lr)
    device = next(model.parameters()).device
    model.train()
    batches = _cycle(d_b, tokenizer, s1.batch_size, cfg.teacher.max_len)
    for step, batch in zip(range(s1.warmup_steps), batches, strict=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as the warmup
        opt.step()
        log({"step": step, "lm": float(loss.detach())})
    model.eval()
