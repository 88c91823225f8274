"""`PADDTrainer`: Stages II–IV of PADD in one loop (rollouts → rewards → advantages → teacher
scoring → KD + PR-GRPO update → selection-bias update), composing `objectives`.

One `step(problems)`:
1. Sample G responses per prompt from the student (`rollout.generate`, KV cache).
2. Rewards (`rewards.reward`) and group advantages A_i.
3. Stage II: the dense teacher scores the rollouts once, without grad; the per-sequence
   teacher temperature is `T_eff = τ·Φ(A_i)` ("adaptive") or τ ("fixed").
4. `num_iterations` updates on the batch. The first update's forward runs at θ = θ_old, so its
   detached log-probs and router probabilities *are* the old policy's (bit-identical to a
   separate no-grad forward, one forward cheaper). Each update: drift Γ between current and old
   router probs (Stage III), ratio ρ̂ = ρ·exp(−λ·sg(Γ)·1[A<0]), clipped surrogate J, KD on
   response tokens (of every rollout, or of those `kd_on` names), loss
   `−J + α_KD·L_KD (+ β·KL_ref)`, optimiser step, then Stage IV: the selection bias moves by
   `−η(f_j − f̄) + γ·EMA(A_j)` from the load and mean advantage of the tokens routed in that
   forward (summed over ranks when torch.distributed is initialised).

The student runs in eval mode throughout (no dropout / router jitter): the ratio must be
exactly 1 at θ_old and a seed must reproduce a run.

Legend: P prompts, G generations, B = P·G rows, S = P_len + R tokens, R response columns,
V vocab, H hidden, L MoE layers, E experts, k experts per token.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

import padd.kernels as kernels
from padd.data.problem import Problem, format_prompt

from .checkpointing import (
    Checkpoint,
    StateIO,
    TrainerState,
    atomic_dir,
    read_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
    write_checkpoint,
)
from .config import PADDConfig
from .evaluation import evaluate
from .metrics import expert_counts, load_cv, routing_entropy
from .objectives import (
    advantage_temperature,
    clip_fraction,
    clipped_surrogate,
    drift_penalised_ratio,
    expert_load_and_advantage,
    group_advantages,
    groups_with_signal,
    informative_groups,
    masked_mean,
    reference_kl,
    router_drift,
    update_selection_bias,
)
from .rewards import answer_reward, format_reward, reward
from .rollout import (
    RolloutBatch,
    forward_with_routing,
    generate,
    position_ids_from_mask,
    response_slice,
    token_logprobs,
)

if TYPE_CHECKING:
    from padd.decompress.sequence_targets import SequenceRouterTargets

__all__ = ["PADDTrainer", "frozen_reference"]


class _PolicyForward(NamedTuple):
    """One student forward on the rollouts (response positions only)."""

    hidden_BRH: torch.Tensor
    logits_BRV: torch.Tensor
    logp_BR: torch.Tensor  # with grad
    router_probs: list[torch.Tensor]  # L × [B, R, E], no grad
    router_logits: list[torch.Tensor]  # L × [B·S, E]
    selected: list[torch.Tensor]  # L × [B·S, k]


class _OldPolicy(NamedTuple):
    """θ_old's quantities, fixed for the updates of one rollout batch."""

    logp_BR: torch.Tensor
    router_probs: list[torch.Tensor]
    ref_logp_BR: torch.Tensor | None


def frozen_reference(student: torch.nn.Module) -> torch.nn.Module:
    """The reference policy for the β-weighted KL: a frozen, hook-free copy of `student` now.

    Make it before anything shards the student (FSDP2 modules refuse a deep copy), then shard
    it the same way and pass it to `PADDTrainer(reference=...)`; the trainer makes its own when
    none is given.
    """
    return _copy_without_hooks(student).eval().requires_grad_(False)


def _copy_without_hooks(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` whose modules carry none of its forward hooks and pre-hooks.

    A caller's `RoutingControl` hooks the student before the trainer sees it; on the copy they
    would route with the live selection bias and capture the copy's router logits as the
    policy's. The copy is made without them (its hook registries start empty), not cleared after.
    transformers' output-recording hooks, if a forward installed them, are left out as well: the
    reference is only asked for logits.
    """
    registries = (
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
    )
    memo: dict[int, object] = {}
    for module in model.modules():
        for name in registries:
            registry = getattr(module, name)
            memo[id(registry)] = type(registry)()
    return copy.deepcopy(model, memo)


def _has_moe_router(model) -> bool:
    from padd.moe.routing_control import find_moe_routers

    return bool(find_moe_routers(model))


class PADDTrainer:
    """PADD's training loop; every baseline is a `PADDConfig` preset of it.

    Args:
        student: a transformers causal LM, MoE (Mixtral, Qwen3-MoE, ...) or dense (then Stages
            III–IV are off by construction).
        teacher: a dense transformers causal LM with the same tokenizer; needed when
            `config.use_kd` (may be None otherwise). Frozen here.
        tokenizer: shared tokenizer (a pad or EOS token is required for batching).
        config: `PADDConfig` (default: the `padd` preset).
        control: the student's `RoutingControl`; built here for an MoE student when omitted.
        optimizer: optional; default AdamW(lr, weight_decay) over the student's trainable params.
        reward_fn: optional `(completion, problem) -> float`; default `rewards.reward` with the
            config's `w_answer` / `w_format`. Accuracy is always the exact-match answer reward.
        router_targets: a `padd.decompress.SequenceRouterTargets` (tied-group students): with
            `config.router_weight > 0` the loss adds `router_weight · Σ_l KL(p_S,l ‖ p_T)` over
            every real token of the rollouts, `p_T` from the teacher's reading of the prompt.
        reference: the frozen reference policy for `config.beta > 0` (`frozen_reference`);
            default a copy of the student as given. Pass one when the student is sharded.
        state_io: how checkpoints read and write model and optimiser state (default plain
            `state_dict`, `StateIO()`); a sharded run passes one that gathers and scatters.

    Example:
        >>> trainer = PADDTrainer(student, teacher, tokenizer, preset("padd", num_generations=4))
        >>> metrics = trainer.step(problems[:8])   # one PADD step on 8 prompts
        >>> trainer.save_checkpoint("run/step_100")
    """

    def __init__(
        self,
        student,
        teacher,
        tokenizer,
        config: PADDConfig | None = None,
        control=None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        reward_fn: Callable[[str, Problem], float] | None = None,
        router_targets: SequenceRouterTargets | None = None,
        reference: torch.nn.Module | None = None,
        state_io: StateIO | None = None,
    ) -> None:
        self.config = config if config is not None else PADDConfig()
        cfg = self.config
        if reference is not None and cfg.beta <= 0:
            raise ValueError("a reference model is only used with PADDConfig.beta > 0 (the reference KL)")
        seed_everything(cfg.seed)
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        self.reward_fn = reward_fn or self._default_reward
        # The reference is the initial policy as transformers computes it, so it is copied before
        # this trainer attaches its routing hooks (see `_copy_without_hooks` for a caller's).
        self.reference = reference
        if cfg.beta > 0 and reference is None:
            self.reference = frozen_reference(student)
        self.moe = control is not None or _has_moe_router(student)
        if self.moe and control is None:
            from padd.moe.routing_control import RoutingControl

            control = RoutingControl(student)
        if self.moe and control.mode != "learned":
            raise ValueError(
                f"RoutingControl.mode is {control.mode!r} (Stage I warmup routing); "
                "Stages II–IV train the learned router: set control.mode = 'learned'"
            )
        self.control = control
        self.router_targets = router_targets if (self.moe and cfg.router_weight > 0) else None
        if cfg.router_weight > 0 and self.moe and router_targets is None:
            raise ValueError("PADDConfig.router_weight > 0 needs router_targets (a tied-group student)")
        if cfg.use_kd or self.router_targets is not None:
            if teacher is None:
                raise ValueError("PADDConfig.use_kd=True or router_weight > 0 needs a teacher model")
            teacher.eval().requires_grad_(False)
        student.eval()  # see module doc: no dropout, ratio exactly 1 at θ_old
        self.state_io = state_io if state_io is not None else StateIO()
        params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = optimizer or torch.optim.AdamW(
            params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        bias_shape = (control.num_layers, control.num_experts) if self.moe else (0, 0)
        device = control.selection_bias.device if self.moe else torch.device("cpu")
        self.ema_state = torch.zeros(bias_shape, dtype=torch.float32, device=device)
        self.step_count = 0
        self.skipped_updates = 0  # non-finite updates dropped (see `_update`)

    def _default_reward(self, completion: str, problem: Problem) -> float:
        return reward(completion, problem.final_answer, self.config.w_answer, self.config.w_format)

    # -- one step ---------------------------------------------------------------------------

    def step(self, problems: Sequence[Problem]) -> dict:
        """One PADD step on `problems` (one group of G rollouts each); returns the step's metrics.

        With `config.dynamic_sampling` = m > 1, rollouts are drawn for every prompt and the update
        takes len(problems) / m groups of them (`objectives.informative_groups`).
        """
        cfg = self.config
        if len(problems) % cfg.dynamic_sampling:
            raise ValueError(
                f"{len(problems)} prompts: with dynamic_sampling={cfg.dynamic_sampling} a step needs a "
                "multiple of it (it updates on len(problems) / dynamic_sampling groups)"
            )
        t_start = time.perf_counter()
        batch = generate(
            self.student,
            self.tokenizer,
            [format_prompt(p.question) for p in problems],
            num_generations=cfg.num_generations,
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
        )
        t_gen = time.perf_counter()
        rows = [p for p in problems for _ in range(cfg.num_generations)]
        answers = [p.final_answer for p in rows]
        r_B = torch.tensor(
            [float(self.reward_fn(c, p)) for c, p in zip(batch.completions, rows, strict=True)]
        )
        r_PG = r_B.view(len(problems), -1)
        # What the policy samples, over every prompt drawn (before dynamic sampling keeps some).
        metrics = {
            "step": self.step_count,
            "reward": float(r_B.mean()),
            "reward_std": float(r_B.std()) if r_B.numel() > 1 else 0.0,
            "accuracy": float(
                np.mean([answer_reward(c, a) for c, a in zip(batch.completions, answers, strict=True)])
            ),
            "format_reward": float(np.mean([format_reward(c) for c in batch.completions])),
            "completion_length": float(batch.response_mask_BR.sum(1).mean()),
            "informative_groups": float(groups_with_signal(r_PG).float().mean()),
            "prompts_sampled": len(problems),
        }
        if cfg.dynamic_sampling > 1:
            kept = informative_groups(r_PG, len(problems) // cfg.dynamic_sampling)
            batch = batch.select_groups(kept, cfg.num_generations)
            problems = [problems[i] for i in kept.tolist()]
            r_PG = r_PG[kept]
            metrics["kept_informative_groups"] = float(groups_with_signal(r_PG).float().mean())
        metrics["prompts_updated"] = len(problems)
        adv_B = group_advantages(r_PG, cfg.adv_eps, cfg.scale_rewards).reshape(-1)
        t_reward = time.perf_counter()
        device = batch.sequences_BS.device
        adv_B = adv_B.to(device)
        teacher_out, t_eff_B, route_target = None, None, None
        if cfg.use_kd or self.router_targets is not None:
            teacher_out, t_eff_B, route_target = self._score_with_teacher(batch, adv_B)
            if not cfg.use_kd:  # the teacher ran for the routing targets only
                teacher_out, t_eff_B = None, None
        kd_rows_B = None
        if teacher_out is not None:
            kd_rows_B = self._kd_rows(adv_B, problems)
            metrics["kd_rows"] = float(kd_rows_B.float().mean())
        if t_eff_B is not None:
            metrics.update(
                t_eff_mean=float(t_eff_B.mean()),
                t_eff_min=float(t_eff_B.min()),
                t_eff_max=float(t_eff_B.max()),
            )
        t_teacher = time.perf_counter()
        metrics.update(self._update(batch, adv_B, teacher_out, t_eff_B, route_target, kd_rows_B))
        t_end = time.perf_counter()
        metrics.update(
            time_generation=t_gen - t_start,
            time_reward=t_reward - t_gen,
            time_teacher=t_teacher - t_reward,
            time_update=t_end - t_teacher,
            time_step=t_end - t_start,
        )
        self.step_count += 1
        return metrics

    @torch.no_grad()
    def _score_with_teacher(self, batch: RolloutBatch, adv_B: torch.Tensor):
        """Teacher hidden states at the response positions [B, R, H], T_eff per row [B] and, with
        router targets, the routing target log-probabilities of every row [B, E]."""
        cfg = self.config
        base = self.teacher.get_decoder()
        out = base(
            input_ids=batch.sequences_BS,
            attention_mask=batch.attention_mask_BS,
            position_ids=position_ids_from_mask(batch.attention_mask_BS),
        )
        hidden_BRH = response_slice(out.last_hidden_state, batch.prompt_length)
        route_target_BE = None
        if self.router_targets is not None:
            from padd.decompress.sequence_targets import prompt_mean

            P = batch.prompt_length
            feats = prompt_mean(out.last_hidden_state[:, :P], batch.attention_mask_BS[:, :P])
            route_target_BE = self.router_targets.expert_log_targets(feats)
        if cfg.kd_temperature_mode == "adaptive":
            t_eff_B = advantage_temperature(adv_B, cfg.tau, cfg.rho, cfg.kappa)
        else:
            t_eff_B = torch.full_like(adv_B, cfg.tau)
        return hidden_BRH, t_eff_B, route_target_BE

    def _fused_kd(self, device: torch.device):
        """`padd.kernels.fused_linear_kd_loss` when configured (`kd_fused`), else None."""
        if self.config.kd_fused is False or (self.config.kd_fused == "auto" and device.type != "cuda"):
            return None
        return kernels.fused_linear_kd_loss

    def _kd_rows(self, adv_B: torch.Tensor, problems: Sequence[Problem]) -> torch.Tensor:
        """The rollouts L_KD averages over (bool [B]), as `kd_on` names them."""
        if self.config.kd_on == "teacher_correct":
            solves = self._teacher_solves(problems).to(adv_B.device)
            return solves.repeat_interleave(self.config.num_generations)
        return torch.ones_like(adv_B, dtype=torch.bool)

    @torch.no_grad()
    def _teacher_solves(self, problems: Sequence[Problem]) -> torch.Tensor:
        """Whether the teacher's own greedy answer to each prompt earns the answer reward (bool [P]):
        the verifier, not a label, says where the teacher is worth distilling."""
        graded = evaluate(
            self.teacher,
            self.tokenizer,
            problems,
            max_new_tokens=self.config.max_new_tokens,
            batch_size=len(problems),
        )
        return torch.tensor(graded["correct"], dtype=torch.bool)

    def _kd_term(self, student_hidden_BRH, student_logits_BRV, teacher_hidden_BRH, t_eff_B, mask_BR):
        """L_KD = mean over response tokens of D(p*_T ‖ p_S), teacher at T_eff of its sequence."""
        cfg = self.config
        keep = mask_BR.bool()
        if not keep.any():  # e.g. `kd_on="teacher_correct"` and the teacher solves none
            return student_logits_BRV.new_zeros(())
        temp_N = t_eff_B[:, None].expand_as(mask_BR)[keep]
        t_head = self.teacher.get_output_embeddings()
        loss_kwargs = dict(divergence=cfg.kd_divergence, temperature=temp_N, beta=cfg.kd_jsd_mix)
        fused = self._fused_kd(student_hidden_BRH.device)
        if fused is not None:  # neither [N, V] teacher logits nor the KD intermediates are built
            s_head = self.student.get_output_embeddings()
            teacher = kernels.TeacherHead(teacher_hidden_BRH[keep], t_head.weight, t_head.bias)
            return fused(
                student_hidden_BRH[keep], s_head.weight, teacher, student_head_bias=s_head.bias, **loss_kwargs
            )
        with torch.no_grad():
            teacher_logits_NV = t_head(teacher_hidden_BRH[keep])
        return kernels.kd_loss(student_logits_BRV[keep], teacher_logits_NV, **loss_kwargs)

    def _update(
        self, batch: RolloutBatch, adv_B, teacher_hidden_BRH, t_eff_B, route_target_BE=None, kd_rows_B=None
    ) -> dict:
        """`num_iterations` optimiser steps on one rollout batch, each followed by Stage IV."""
        cfg = self.config
        log: dict[str, list[float]] = defaultdict(list)
        old: _OldPolicy | None = None
        routing: dict = {}
        for _ in range(cfg.num_iterations):
            fwd = self._policy_forward(batch)
            if old is None:  # θ = θ_old at the first update (see module doc)
                old = _OldPolicy(fwd.logp_BR.detach(), fwd.router_probs, self._reference_logp(batch))
                routing = self._routing_metrics(fwd.router_logits, fwd.selected, batch)
            loss = self._loss(fwd, old, batch, adv_B, teacher_hidden_BRH, t_eff_B, log, kd_rows_B)
            if route_target_BE is not None:
                route = self._route_term(fwd.router_logits, route_target_BE, batch)
                loss = loss + cfg.router_weight * route
                log["route_loss"].append(float(route.detach()))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if not (math.isfinite(grad_norm) and math.isfinite(float(loss.detach()))):
                # A non-finite loss or gradient must not reach the weights, the optimiser's
                # moments or the bias: drop this update and count it.
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_updates += 1
                log["skipped_updates"].append(1.0)
                continue
            log["grad_norm"].append(grad_norm)
            log["skipped_updates"].append(0.0)
            self.optimizer.step()
            if self.moe and cfg.use_bias:
                self._update_bias(fwd.selected, adv_B, batch)
        # KD at θ_old (comparable across steps); the rest averaged over the updates.
        out = {k: v[0] if k == "kd_loss" else float(np.mean(v)) for k, v in log.items()}
        out["skipped_updates"] = int(sum(log["skipped_updates"]))
        # The drift is 0 by construction at the first update: report the later ones'.
        drifts = log["router_drift"][1:]
        out["router_drift"] = float(np.mean(drifts)) if drifts else 0.0
        out.update(routing)
        if self.moe:
            out["bias_abs_mean"] = float(self.control.selection_bias.abs().mean())
            # Stage IV's reward signal, mean |EMA(A_j)|: it comes only from rollouts of one
            # prompt that take different experts (advantages are centred per prompt).
            out["expert_adv_ema_abs"] = float(self.ema_state.abs().mean())
        return out

    def _policy_forward(self, batch: RolloutBatch) -> _PolicyForward:
        """The student's forward on the rollouts: what the loss, drift and Stage IV need."""
        P = batch.prompt_length
        B, S = batch.sequences_BS.shape
        hidden_BSH, router_logits, selected = forward_with_routing(
            self.student, batch.sequences_BS, batch.attention_mask_BS, self.control, moe=self.moe
        )
        hidden_BRH = response_slice(hidden_BSH, P)
        logits_BRV = self.student.get_output_embeddings()(hidden_BRH)
        # The policy that sampled is softmax(z / T_sample): ratios use the same distribution.
        logp_BR = token_logprobs(logits_BRV / self.config.temperature, batch.sequences_BS[:, P:])
        with torch.no_grad():  # router probabilities only enter through sg(Γ)
            probs = [response_slice(torch.softmax(z.float(), -1).reshape(B, S, -1), P) for z in router_logits]
        return _PolicyForward(hidden_BRH, logits_BRV, logp_BR, probs, router_logits, selected)

    @torch.no_grad()
    def _reference_logp(self, batch: RolloutBatch) -> torch.Tensor | None:
        if self.reference is None:
            return None
        P = batch.prompt_length
        logits = self.reference(
            input_ids=batch.sequences_BS,
            attention_mask=batch.attention_mask_BS,
            position_ids=position_ids_from_mask(batch.attention_mask_BS),
        ).logits
        return token_logprobs(response_slice(logits, P) / self.config.temperature, batch.sequences_BS[:, P:])

    def _loss(
        self,
        fwd: _PolicyForward,
        old: _OldPolicy,
        batch,
        adv_B,
        teacher_hidden_BRH,
        t_eff_B,
        log,
        kd_rows_B=None,
    ):
        """`−J_PR-GRPO + α_KD·L_KD (+ β·KL_ref)` for one update; appends its terms to `log`."""
        cfg = self.config
        mask_BR = batch.response_mask_BR
        drift_BR = None
        if fwd.router_probs:
            with torch.no_grad():
                drift_BR = router_drift(fwd.router_probs, old.router_probs)
            log["router_drift"].append(float(masked_mean(drift_BR, mask_BR)))
        ratio_BR = drift_penalised_ratio(
            fwd.logp_BR, old.logp_BR, drift_BR, adv_B, cfg.drift_lambda, drift_on=cfg.drift_on
        )
        objective = clipped_surrogate(ratio_BR, adv_B, cfg.epsilon, mask_BR, cfg.epsilon_high)
        log["policy_loss"].append(-float(objective.detach()))
        log["clip_fraction"].append(
            float(clip_fraction(ratio_BR, adv_B, cfg.epsilon, mask_BR, cfg.epsilon_high))
        )
        loss = -objective
        if teacher_hidden_BRH is not None:
            kd_mask_BR = mask_BR if kd_rows_B is None else mask_BR * kd_rows_B.to(mask_BR.dtype)[:, None]
            kd = self._kd_term(fwd.hidden_BRH, fwd.logits_BRV, teacher_hidden_BRH, t_eff_B, kd_mask_BR)
            loss = loss + cfg.alpha_kd * kd
            log["kd_loss"].append(float(kd.detach()))
        if old.ref_logp_BR is not None:
            kl = masked_mean(reference_kl(fwd.logp_BR, old.ref_logp_BR), mask_BR)
            loss = loss + cfg.beta * kl
            log["ref_kl"].append(float(kl.detach()))
        log["loss"].append(float(loss.detach()))
        return loss

    def _route_term(self, router_logits, route_target_BE, batch: RolloutBatch) -> torch.Tensor:
        """`Σ_l KL(p_S,l ‖ p_T)` over every real token (prompt and response) of the rollouts."""
        B, S = batch.sequences_BS.shape
        target_TE = route_target_BE.repeat_interleave(S, dim=0)
        mask_T = batch.attention_mask_BS.reshape(-1)
        total = target_TE.new_zeros(())
        for z_TE in router_logits:
            total = total + kernels.kd_loss(
                z_TE, target_TE.to(z_TE.device), divergence="reverse_kl", mask=mask_T
            )
        return total

    def _response_selected(self, selected, B: int, S: int, P: int) -> list[torch.Tensor]:
        """Per layer, the experts of the response positions, [B·R, k]."""
        return [response_slice(sel.reshape(B, S, -1), P).reshape(-1, sel.shape[-1]) for sel in selected]

    def _routing_metrics(self, router_logits, selected, batch: RolloutBatch) -> dict:
        if not self.moe:
            return {}
        B, S = batch.sequences_BS.shape
        P = batch.prompt_length
        mask_T = batch.response_mask_BR.reshape(-1)
        sel = self._response_selected(selected, B, S, P)
        logits = [
            response_slice(z.detach().reshape(B, S, -1), P).reshape(-1, z.shape[-1]) for z in router_logits
        ]
        counts = expert_counts(sel, self.control.num_experts, mask_T)
        return {
            "load_cv": load_cv(counts),
            "routing_entropy": routing_entropy(logits, mask_T),
            "tokens_per_expert": counts.long().tolist(),
        }

    @torch.no_grad()
    def _update_bias(self, selected, adv_B, batch: RolloutBatch) -> None:
        """Stage IV after the optimiser step, from the forward that produced this update."""
        cfg = self.config
        mask_BR = batch.response_mask_BR
        (B, S), P, R = batch.sequences_BS.shape, batch.prompt_length, mask_BR.shape[1]
        sel = self._response_selected(selected, B, S, P)
        token_adv = adv_B[:, None].expand(B, R).reshape(-1)
        counts, sums = expert_load_and_advantage(
            sel, token_adv, mask_BR.reshape(-1), self.control.num_experts
        )
        if dist.is_available() and dist.is_initialized():  # every rank must hold the same bias
            both = torch.stack([counts, sums]).to(self.control.selection_bias.device)
            dist.all_reduce(both)
            counts, sums = both[0], both[1]
        load_fraction = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
        adv_mean = torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.full_like(sums, float("nan")))
        update_selection_bias(
            self.control.selection_bias,
            load_fraction,
            adv_mean,
            self.ema_state,
            eta=cfg.bias_eta,
            gamma=cfg.bias_gamma,
            lam_ema=cfg.bias_lam_ema,
        )

    # -- state (the format and the files: `checkpointing`) ----------------------------------

    def _state(self, optimizer_state: dict) -> TrainerState:
        """The trainer state besides the student's weights; tensors alias live state."""
        return TrainerState(
            step=self.step_count,
            optimizer=optimizer_state,
            ema_state=self.ema_state,
            rng=rng_state(),
            config=self.config.to_dict(),
            selection_bias=self.control.selection_bias if self.moe else None,
            # Through `state_io`: a sharded reference is gathered like the student.
            reference=self.state_io.model_state(self.reference) if self.reference is not None else None,
            skipped_updates=self.skipped_updates,
        )

    def _restore(self, state: TrainerState) -> None:
        """Everything of `state` but the optimiser's (its loading depends on sharding)."""
        if self.moe and state.selection_bias is not None:
            self.control.selection_bias.copy_(state.selection_bias)
        self.ema_state.copy_(state.ema_state)
        self.step_count = int(state.step)
        self.skipped_updates = int(state.skipped_updates)
        if self.reference is not None and state.reference is not None:
            self.state_io.load_model_state(self.reference, state.reference)
        set_rng_state(state.rng)

    def state_dict(self) -> dict:
        """Everything a bit-identical resume needs, in memory: `{"student": weights,
        **TrainerState fields}`. Tensors alias live state: `torch.save` it (or deep-copy it)
        before training further."""
        return {"student": self.student.state_dict(), **self._state(self.optimizer.state_dict()).to_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` (same model architecture and config)."""
        self.student.load_state_dict(state["student"])
        trainer_state = TrainerState.from_dict({k: v for k, v in state.items() if k != "student"})
        self.optimizer.load_state_dict(trainer_state.optimizer)
        self._restore(trainer_state)

    def gather_checkpoint(self) -> Checkpoint:
        """Everything `write_checkpoint` stores. A collective when the student is sharded
        (`state_io`): every rank calls it, rank 0 gets the full state."""
        optimizer_state = self.state_io.optimizer_state(self.student, self.optimizer)
        return Checkpoint(self.state_io.model_state(self.student), self._state(optimizer_state))

    def write_checkpoint(
        self, directory: str | os.PathLike, checkpoint: Checkpoint, *, hf_layout: bool = False
    ) -> None:
        """Write a `gather_checkpoint()` into `directory` (not atomic by itself: the pipeline
        wraps it in an atomic folder). `hf_layout`: see `checkpointing.write_checkpoint`."""
        control = self.control if self.moe else None
        write_checkpoint(directory, self.student, checkpoint, control, hf_layout=hf_layout)

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        """Student weights, selection bias and trainer state in `directory`, written atomically
        (single process; a sharded run gathers on every rank and writes on rank 0)."""
        checkpoint = self.gather_checkpoint()
        atomic_dir(directory, lambda tmp: self.write_checkpoint(tmp, checkpoint))

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Resume from a checkpoint folder: weights (copied into the live student in place),
        bias, optimiser, EMA, step, RNG."""
        state = read_checkpoint(directory, self.student, self.state_io)
        self.state_io.load_optimizer_state(self.student, self.optimizer, state.optimizer)
        self._restore(state)
