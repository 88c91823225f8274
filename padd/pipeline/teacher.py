"""Step 1: a tiny dense Llama teacher trained from scratch on the synthetic data, or a local model.

The trained teacher is cached by a fingerprint of everything it depends on (architecture, training
settings, data seed and kinds, held-out questions), so other runs and `--compare` reuse it.
Training is resumable: it checkpoints every `checkpoint_every` steps and on SIGINT/SIGTERM.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from padd.config import PADDRunConfig
from padd.data.problem import Problem, format_example, format_prompt
from padd.data.splits import make_splits
from padd.data.synthetic import iter_problems
from padd.data.tokenizer import DEFAULT_ALPHABET
from padd.pipeline.run_lock import cache_entry_lock
from padd.training.checkpointing import (
    CheckpointDir,
    GracefulInterrupt,
    Interrupted,
    atomic_dir,
    atomic_torch_save,
    rng_state,
    seed_everything,
    set_rng_state,
)

IGNORE = -100


def build_tiny_llama(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position: int,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
) -> LlamaForCausalLM:
    """A small dense Llama with untied embeddings (decompression copies them to the student)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
        hidden_act="silu",
        rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(config)


def encode_sft_batch(
    problems: Sequence[Problem], tokenizer: PreTrainedTokenizerBase, max_len: int
) -> dict[str, torch.Tensor]:
    """`<s> prompt solution </s>`, right-padded; the loss covers the solution and `</s>` only."""
    rows, labels = [], []
    for p in problems:
        prompt_ids = tokenizer(format_prompt(p.question))["input_ids"]  # includes <s>
        full = tokenizer(format_example(p))["input_ids"] + [tokenizer.eos_token_id]
        full = full[:max_len]
        lab = [IGNORE] * min(len(prompt_ids), len(full)) + full[len(prompt_ids) :]
        rows.append(full)
        labels.append(lab)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    label_t = torch.tensor([lab + [IGNORE] * (width - len(lab)) for lab in labels])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_t}


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    # Linear warmup, then cosine decay to 10% of the base rate.
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train_teacher(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batches: Callable[[int], Iterator[list[Problem]]],
    *,
    steps: int,
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    max_len: int,
    seed: int,
    ckpt_dir: str | Path,
    checkpoint_every: int,
    interrupt: GracefulInterrupt,
    log: Callable[[dict[str, Any]], None] = lambda rec: None,
    progress: bool = True,
) -> PreTrainedModel:
    """Supervised training on worked solutions; resumes from `ckpt_dir` when it holds a checkpoint.

    `batches(start_step)` yields the batch of each step from `start_step` on; it must be a pure
    function of the step so that a resumed run sees exactly the batches it would have seen.
    """
    ckpts = CheckpointDir(ckpt_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    start = 0
    seed_everything(seed)
    latest = ckpts.latest()
    if latest is not None:
        state = torch.load(latest / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start = state["step"]

    def save(step: int) -> None:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(), "step": step}
        ckpts.save(step, lambda d: atomic_torch_save(state, d / "state.pt"))

    model.train()
    bar = tqdm(total=steps, initial=start, desc="teacher", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    it = batches(start)
    for step in range(start, steps):
        batch = encode_sft_batch(next(it), tokenizer, max_len)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup_steps)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        bar.update(1)
        if done % 25 == 0 or done == steps:
            rec = {"stage": "teacher", "step": done, "loss": loss.item(), "lr": opt.param_groups[0]["lr"]}
            rec["elapsed_s"] = time.perf_counter() - t0
            log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if interrupt.requested or (checkpoint_every and done % checkpoint_every == 0 and done < steps):
            save(done)
            interrupt.check()
    bar.close()
    model.eval()
    return model


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """`save_pretrained` of model and tokenizer into `path`, atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(path, write)


def teacher_cache_key(cfg: PADDRunConfig) -> str:
    """Fingerprint of everything the trained teacher depends on."""
    t = asdict(cfg.teacher)
    for k in ("path", "checkpoint_every"):  # do not change the weights
        t.pop(k)
    d = cfg.data
    key = {
        "teacher": t,
        "alphabet": DEFAULT_ALPHABET,
        "data": [d.source, d.path, d.num_problems, list(d.kinds), cfg.problem_seed],
        "version": 1,
    }
    return "tiny-llama-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def teacher_batches(
    cfg: PADDRunConfig, problems: Sequence[Problem]
) -> Callable[[int], Iterator[list[Problem]]]:
    """Per-step training batches of the teacher, a pure function of the step.

    Synthetic data: a fresh seeded stream that never contains a question of the run's own problems
    (so D_D is truly held out and D_C prompts are new to the teacher too). Files: seeded epochs over
    the run's problems outside D_D (the caller passes those).
    """
    bs = cfg.teacher.batch_size
    if cfg.data.source == "synthetic":
        exclude = {p.question for p in problems}

        def synthetic(start: int) -> Iterator[list[Problem]]:
            stream = (
                p for p in iter_problems(cfg.teacher.data_seed, cfg.data.kinds) if p.question not in exclude
            )
            for _ in range(start * bs):  # replay the stream up to the resumed step (cheap)
                next(stream)
            while True:
                yield [next(stream) for _ in range(bs)]

        return synthetic

    pool = list(problems)

    def epochs(start: int) -> Iterator[list[Problem]]:
        step = start
        while True:
            out = []
            for j in range(step * bs, (step + 1) * bs):
                epoch, pos = divmod(j, len(pool))
                g = torch.Generator().manual_seed(cfg.teacher.data_seed * 7919 + epoch)
                out.append(pool[int(torch.randperm(len(pool), generator=g)[pos])])
            yield out
            step += 1

    return epochs


def ensure_teacher(
    cfg: PADDRunConfig,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    problems: Sequence[Problem],
    interrupt: GracefulInterrupt,
    log: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Make sure a trained teacher exists at `path` (train it when missing; resumable).

    Runs that share the cache (seeds started side by side) train it once: the first holds
    `<path>.lock` while it trains, the others wait for it and then load its teacher."""
    if cfg.teacher.source in ("pretrained", "shipped") or (path / "config.json").exists():
        return {"cached": True}

    def say_waiting(holder: dict[str, Any]) -> None:
        who = f"pid {holder['pid']} on {holder.get('host', '?')}" if "pid" in holder else "another run"
        print(f"[padd] teacher: {who} is training this teacher into {path}; waiting for it", flush=True)

    try:
        with cache_entry_lock(path, on_wait=say_waiting, should_stop=lambda: interrupt.requested):
            if (path / "config.json").exists():  # trained by the run we waited for
                return {"cached": True}
            return _train_and_save_teacher(cfg, tokenizer, path, problems, interrupt, log)
    except InterruptedError:  # a stop asked for while waiting: nothing of ours to save
        if interrupt.signum is None:
            raise
        raise Interrupted(interrupt.signum) from None


def _train_and_save_teacher(
    cfg: PADDRunConfig,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    problems: Sequence[Problem],
    interrupt: GracefulInterrupt,
    log: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Train the tiny teacher (resuming from `<path>.ckpt`) and save it atomically to `path`."""
    t = cfg.teacher
    seed_everything(t.data_seed)
    model = build_tiny_llama(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        num_layers=t.num_layers,
        num_heads=t.num_heads,
        intermediate_size=t.intermediate_size,
        max_position=t.max_position,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if cfg.data.source != "synthetic":
        s = cfg.data.splits
        splits = make_splits(problems, (s.a, s.b, s.c, s.d), seed=cfg.problem_seed)
        held_out = {problems[i].question for i in splits.indices["D"]}
        problems = [p for p in problems if p.question not in held_out]
    t0 = time.perf_counter()
    train_teacher(
        model,
        tokenizer,
        teacher_batches(cfg, problems),
        steps=t.steps,
        lr=t.lr,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_len=t.max_len,
        seed=t.data_seed,
        ckpt_dir=path.with_name(path.name + ".ckpt"),
        checkpoint_every=t.checkpoint_every,
        interrupt=interrupt,
        log=log,
        progress=cfg.run.progress,
    )
    seconds = time.perf_counter() - t0
    save_model(model, tokenizer, path)
    shutil.rmtree(path.with_name(path.name + ".ckpt"), ignore_errors=True)
    return {"cached": False, "train_s": seconds, "params": sum(p.numel() for p in model.parameters())}
