"""Every MoE family of the installed transformers on padd: exact against "eager", or refused.

The families are discovered at test time (`hf_families.discover_families`), so a transformers
release that adds one is checked the day it is installed. For each family a tiny random model
is built and its expert weights inflated until pre-activations pass the clamps (7–10) that
families such as DeepSeek-V4 and GPT-OSS apply. Then:

- `experts_implementation="padd"` against "eager" on the same weights: forward logits
  (relative 1e-4), every expert and router gradient (relative 1e-3), greedy `generate()` tokens
  (identical), with padd's experts function proven to have run;
- every sparse MoE block through `padd.MoE.from_hf`: equal to the block's own forward on fresh
  inputs, or refused with one line;
- `docs/families.md`, the table of what runs fused, through the general path or is refused, is
  what `families_table()` makes of the installed transformers (regenerate it with
  `PADD_WRITE_FAMILIES=1 python -m pytest tests/test_hf_families.py -k table`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from hf_families import (
    Family,
    Unbuildable,
    build_tiny_model,
    discover_families,
    inflate_expert_weights,
    input_ids,
    randomize_block_norms,
    randomize_routing_knobs,
)

import padd  # noqa: F401  (registers "padd")
from padd import MoE
from padd.moe import hf_experts
from padd.moe.experts_plan import is_experts_module, plan_experts
from padd.moe.routing_control import check_routers

FAMILIES = discover_families()
FAMILIES_MD = Path(__file__).resolve().parents[1] / "docs" / "families.md"


def _build(family: Family) -> torch.nn.Module:
    try:
        model = build_tiny_model(family, seed=0)
    except Unbuildable as why:
        pytest.skip(f"{family.model_type}: tiny config not buildable on the CPU: {why}")
    inflate_expert_weights(model)
    return model


def _outputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)  # some families draw noise in their forward (diffusion_gemma): the same draw
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def _relative(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-30) -> float:
    """`max |got - want| / max(max |want|, floor)`: the floor keeps a gradient that is float noise
    (a saturated router's, ~1e-8) from being judged against its own noise."""
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(floor))


@pytest.fixture
def padd_calls(monkeypatch):
    calls = []
    real = hf_experts.padd_experts_forward

    def spy(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return real(self, *args, **kwargs)

    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS._global_mapping, "padd", spy)
    return calls


@pytest.mark.parametrize("family", FAMILIES, ids=[f.model_type for f in FAMILIES])
def test_padd_experts_equal_eager(family, padd_calls):
    eager = _build(family).train()  # train mode: gradients as in training; dropout is 0 in tiny configs
    model = copy.deepcopy(eager)
    model.set_experts_implementation("padd")
    ids = input_ids(eager, seed=1)
    want = _outputs(eager, ids)
    got = _outputs(model, ids)
    assert padd_calls, "padd's experts function never ran"
    assert torch.isfinite(want).all()
    assert _relative(got, want) <= 1e-4, f"forward differs by {_relative(got, want):.2e}"

    grad = torch.randn_like(want)
    (want * grad).sum().backward()
    (got * grad).sum().backward()
    eager_params = dict(eager.named_parameters())
    pairs = []
    for name, param in model.named_parameters():
        ref = eager_params[name].grad
        if (param.grad is None and ref is None) or not any(
            k in name for k in (".experts.", ".gate.", "router")
        ):
            continue
        assert param.grad is not None and ref is not None, name
        pairs.append((name, param.grad, ref))
    # Noise floor: 1e-4 of the largest expert/router gradient of the model.
    floor = 1e-4 * max(float(ref.abs().max()) for _, _, ref in pairs) if pairs else 0.0
    for name, got_grad, ref in pairs:
        gap = _relative(got_grad, ref, floor)
        assert gap <= 1e-3, f"{name}: gradient differs by {gap:.2e}"
    checked = len(pairs)
    assert checked, "no expert gradient was compared"


@pytest.mark.parametrize("family", FAMILIES, ids=[f.model_type for f in FAMILIES])
def test_padd_generate_equals_eager(family, padd_calls):
    eager = _build(family).eval()
    if not hasattr(eager, "generate") or not eager.can_generate():
        pytest.skip(f"{family.model_type}: {type(eager).__name__} does not generate")
    model = copy.deepcopy(eager)
    model.set_experts_implementation("padd")
    ids = input_ids(eager, seed=2)
    kwargs = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)
    with torch.no_grad():
        torch.manual_seed(0)
        want = eager.generate(ids, **kwargs)
        torch.manual_seed(0)
        got = model.generate(ids, **kwargs)
    assert padd_calls
    sequences = lambda out: out if isinstance(out, torch.Tensor) else out.sequences
    assert torch.equal(sequences(got), sequences(want))


def _blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "experts", None), torch.nn.Module) and is_experts_module(m.experts)
    ]


# Blocks that padd.MoE.from_hf must convert (not merely refuse): one per routing and layout it
# takes, so that a regression to a refusal fails here rather than only changing docs/families.md.
MUST_CONVERT = {
    "mixtral",  # softmax, renormalised
    "qwen2_moe",  # sigmoid-gated shared expert
    "deepseek_v3",  # sigmoid, correction bias, groups, routed scaling factor, shared experts
    "unlimited_ocr",  # topk_method="greedy" despite n_group
    "gpt_oss",  # router bias, transposed + biased + interleaved experts, clamped activation
    "aria",  # transposed experts, `router`
    "granitemoe",  # softmax over the top-k logits
    "jamba",  # unnormalised top-k
    "hunyuan_v1_moe",  # router `gate.wg`, `shared_mlp`
    "afmoe",  # correction bias on the block, `route_scale`
    "hy_v3",  # correction bias on the block, passed to the router
    "ernie4_5_moe",  # softmax with the correction bias on the probabilities
    "kolibri1",  # sigmoid with the correction bias on the logits
    "beam",  # routed scaling factor applied by the block
    "glm5_next",  # clamped SwiGLU
    "inkling2",  # soft-capped SwiGLU (caps read from the module), sigmoid router, correction bias
    "nemotron_h",  # no gate: relu² of up_proj; sigmoid, correction bias, groups, shared experts
    "axk1",  # a norm of the block's output (post_mlp_layernorm), held as output_norm
    "longcat_flash",  # zero-computation experts: router slots beyond the experts add the input
}

# Blocks that must be refused, and a word the one-line refusal must hold: what the block computes
# beyond routed projections (+ shared experts), which padd.MoE has no place for.
MUST_REFUSE = {
    "ergo": "post_expert_norm",  # a per-route RMSNorm inside its experts' own forward
}


def from_hf_outcome(block: torch.nn.Module) -> tuple[MoE | None, str]:
    """`(moe, "exact")` or `(None, the one-line refusal)` for one block, its knobs randomised."""
    randomize_routing_knobs(block)
    randomize_block_norms(block)
    try:
        return MoE.from_hf(block), "exact"
    except (NotImplementedError, TypeError) as refusal:
        message = str(refusal)
        assert "\n" not in message and type(block).__name__ in message, message
        return None, message


@pytest.mark.parametrize("family", FAMILIES, ids=[f.model_type for f in FAMILIES])
def test_from_hf_equals_the_block_or_refuses(family):
    """Each block converts to a padd.MoE equal to its own forward (output, and the gradients of
    every parameter they share) on fresh inputs, past the clamps and with its correction biases,
    router biases and routing scales made to act; or it is refused with one line."""
    model = _build(family).eval()
    blocks = _blocks(model)
    assert blocks, "no sparse MoE block found"
    converted = 0
    for name, block in blocks:
        moe, outcome = from_hf_outcome(block)
        if family.model_type in MUST_REFUSE:
            assert moe is None and MUST_REFUSE[family.model_type] in outcome, outcome
        if moe is None:
            continue
        converted += 1
        first = "gate_up_proj" if moe.gated else "up_proj"  # the experts' own name, shared not copied
        assert getattr(moe, first) is getattr(block.experts, first), first
        assert moe.down_proj is block.experts.down_proj
        # Fresh inputs, not the verification probe: the block's own forward is the oracle.
        generator = torch.Generator().manual_seed(7)
        x = torch.randn(3, 5, moe.hidden_size, generator=generator) * 4
        grad_out = torch.randn(3, 5, moe.hidden_size, generator=generator)
        want = block(x)
        want = want[0] if isinstance(want, tuple) else want
        shared = [p for p in moe.parameters() if p.requires_grad]
        want_grads = torch.autograd.grad((want * grad_out).sum(), shared, allow_unused=True)
        got = moe(x)
        got_grads = torch.autograd.grad((got * grad_out).sum(), shared, allow_unused=True)
        assert _relative(got, want) <= 1e-4, f"{name}: forward differs by {_relative(got, want):.2e}"
        floor = 1e-4 * max(float(g.abs().max()) for g in want_grads if g is not None)
        names = {id(p): n for n, p in moe.named_parameters()}
        for param, g, ref in zip(shared, got_grads, want_grads, strict=True):
            if ref is None:
                assert g is None or not g.any(), names[id(param)]
                continue
            gap = _relative(g, ref, floor)
            assert gap <= 1e-3, f"{name}.{names[id(param)]}: gradient differs by {gap:.2e}"
    if family.model_type in MUST_CONVERT:
        assert converted, f"{family.model_type}: no block converted"


def _routing_control_support(model: torch.nn.Module) -> str:
    try:
        check_routers(model)
    except ValueError as error:
        message = str(error)
        if "routes otherwise" in message:
            return "refused: not softmax top-k"
        if "has no transformers MoE router" in message:
            return "refused: no `gate` router found"
        if "does not run on them alone" in message:
            return "refused: router needs more than hidden states"
        return "refused"
    return "yes"


def _from_hf_support(model: torch.nn.Module) -> str:
    """ "exact" when every sparse MoE block converts, else the first refusal, less its prefix."""
    inflate_expert_weights(model)
    for _, block in _blocks(model):
        moe, outcome = from_hf_outcome(block)
        if moe is None:
            return "refused: " + outcome.split(": ", 2)[-1]
    return "exact"


def families_table() -> str:
    """`docs/families.md`: each discovered family, its experts class and what padd does with it."""
    rows = []
    counts = {"fused": 0, "general": 0, "refused": 0, "not built": 0}
    for family in FAMILIES:
        try:
            model = build_tiny_model(family, seed=0)
        except Unbuildable as why:
            rows.append((family.model_type, "—", "not built", str(why), "—", "—"))
            counts["not built"] += 1
            continue
        steering = _routing_control_support(model)
        conversion = _from_hf_support(model)
        seen = set()
        for module in model.modules():
            if not is_experts_module(module) or type(module) in seen:
                continue
            seen.add(type(module))
            try:
                plan = plan_experts(module)
            except NotImplementedError as error:
                path, why = "refused", str(error)
            else:
                path, why = ("fused" if plan.fused else "general"), plan.why
            counts[path] += 1
            rows.append((family.model_type, type(module).__name__, path, why, steering, conversion))
    import transformers

    built = len({row[0] for row in rows if row[2] != "not built"})
    exact = len({row[0] for row in rows if row[5] == "exact"})
    lines = [
        "# MoE families on padd",
        "",
        "Generated by `tests/test_hf_families.py` (`families_table`) from transformers "
        f"{transformers.__version__}; a test keeps it current. Every row is checked against the "
        'family\'s own "eager" experts: forward, expert gradients and greedy `generate()`.',
        "",
        "- **fused**: the experts' activation is one of `padd.kernels.moe_ffn`'s (recognised by",
        "  running the module's own `_apply_gate`). The parameters shown (limits, caps) are the",
        "  tiny test configs'; padd reads each model's own, and the tests lower some so that the",
        "  inflated weights reach them (Inkling2's up cap: 25 in the family's config, 6 here).",
        "- **general**: padd's routing and grouped GEMMs with the module's own `_apply_gate`,",
        "  `act_fn` or `post_expert_norm` between them; exact, slower.",
        '- **refused**: `experts_implementation="padd"` raises when the model is built or switched.',
        "- **RoutingControl**: whether `padd.RoutingControl` (selection bias, frozen warmup routing,",
        "  router-logit capture; what `padd train` needs of a pre-trained MoE student) accepts the",
        "  family's routers; it refuses the others at setup. `padd.decompress` builds Mixtral,",
        "  Qwen2-MoE and Qwen3-MoE students only.",
        "- **from_hf**: `padd.MoE.from_hf` on the family's sparse MoE blocks (weights inflated past",
        "  the clamps, correction biases, router biases and routing scales made to act): exact",
        "  (verified against the block's own forward, output and gradients) or refused, and why.",
        "",
        f"Totals (experts classes): {', '.join(f'{v} {k}' for k, v in counts.items())}.",
        f"`padd.MoE.from_hf` (families): {exact} exact, {built - exact} refused.",
        "",
        "| family | experts class | padd | why | RoutingControl | from_hf |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {a} | {b} | {c} | {d.replace('|', '/')} | {e} | {f.replace('|', '/')} |"
        for a, b, c, d, e, f in rows
    ]
    return "\n".join(lines) + "\n"


def test_families_table_is_current():
    import transformers

    table = families_table()
    if os.environ.get("PADD_WRITE_FAMILIES") == "1":
        FAMILIES_MD.write_text(table)
    assert FAMILIES_MD.exists(), "docs/families.md is missing: run with PADD_WRITE_FAMILIES=1"
    written = FAMILIES_MD.read_text()
    if f"transformers {transformers.__version__};" not in written:
        pytest.skip(f"docs/families.md describes another transformers than {transformers.__version__}")
    assert written == table, "docs/families.md is stale: run with PADD_WRITE_FAMILIES=1"


def test_every_family_is_discovered_not_listed():
    """Discovery finds the families the issue names, including ones added after padd was written."""
    found = {f.model_type for f in FAMILIES}
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"} <= found
    assert len(found) >= 60
