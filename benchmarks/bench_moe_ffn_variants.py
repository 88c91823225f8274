"""The fused activation variants of real families' experts: padd against transformers' grouped_mm.

    python -m pytest benchmarks/bench_moe_ffn_variants.py -s     (PADD_BENCH_OUT=dir writes JSON)

Each variant is the family's own transformers experts module (its layout flags, biases and
`_apply_gate`), run three ways on the same weights, input and top-k decisions:

- `padd`: `padd_experts_forward`, the function `experts_implementation="padd"` dispatches to
  (fused: the activation, the interleaved gate/up layout and the biases in padd's kernels);
- `transformers grouped_mm`: transformers' `grouped_mm` experts function, which calls the module's
  `_apply_gate` between its grouped GEMMs (what a user of that family has today);
- `transformers eager`: the module's own per-expert loop (the correctness oracle).

Variants: GPT-OSS-20B (hidden 2880, 32 experts of width 2880, top-4; transposed layout, biases,
interleaved gate/up, `(up + 1) · gate · σ(1.702 · gate)` clamped at 7) and DeepSeek-V4 (hidden
4096, 256 experts of width 2048, top-6; SwiGLU clamped at 10). The weights are scaled so that the
gate/up pre-activations pass the clamp on a good share of the rows, as in trained models.

Before any timing, padd's forward is checked against eager (relative error 1e-4 in fp32, 2e-2 in
bf16); a mismatch fails the test instead of reporting a speed. Figures: TFLOP/s over the useful
expert FLOPs (forward 2·T·k·H·3I, forward+backward three times that), % of the bf16 peak on a
known GPU, and padd's speed-up over grouped_mm. On the CPU the shapes are small stand-ins with the
same activations and layouts (labelled CPU; not GPU results).

Environment: PADD_BENCH_TOKENS="512,4096" (GPU default 512,4096,16384; CPU default 256),
PADD_BENCH_MODELS="gpt-oss-20b" (default: both).

Shape legend: T tokens, H hidden, I expert width, E experts, k top_k.
"""

from __future__ import annotations

import pytest
import torch
from padd.kernels.grouped_gemm import moe_ffn_flops
from transformers import AutoConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import padd  # noqa: F401  (registers "padd")
from benchmarks.common import (
    bench_device,
    cpu_reps,
    env_list,
    family_eager_forward,
    make_record,
    on_gpu,
    report_suite,
    time_interleaved,
    write_if_requested,
)
from padd.moe.experts_plan import plan_experts
from padd.moe.hf_experts import padd_experts_forward

SUITE = "moe_ffn_variants"
# name -> (model_type, config keys for (H, I, E, k), GPU shape, CPU stand-in shape, clamp limit)
VARIANTS = {
    "gpt-oss-20b": (
        "gpt_oss",
        ("hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok"),
        (2880, 2880, 32, 4),
        (128, 128, 8, 4),
        7.0,
    ),
    "deepseek-v4": (
        "deepseek_v4",
        ("hidden_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok"),
        (4096, 2048, 256, 6),
        (128, 64, 16, 6),
        10.0,
    ),
}
DTYPE = torch.bfloat16 if on_gpu() else torch.float32
TOKENS = [int(t) for t in env_list("PADD_BENCH_TOKENS", "512,4096,16384" if on_gpu() else "256")]
NAMES = env_list("PADD_BENCH_MODELS", ",".join(VARIANTS))
_REPS = {"warmup": 2, "reps": 10} if on_gpu() else {"warmup": 2, "reps": cpu_reps(10)}
_RECORDS: list = []


def build_experts(name: str) -> tuple[torch.nn.Module, tuple[int, int, int, int]]:
    """The family's experts module at the device's shape, with clamp-reaching random weights."""
    model_type, keys, gpu_shape, cpu_shape, limit = VARIANTS[name]
    shape = gpu_shape if on_gpu() else cpu_shape
    config = AutoConfig.for_model(model_type, **dict(zip(keys, shape, strict=True)))

    experts_cls = _experts_class(model_type)
    device = bench_device()
    # Built in DTYPE on the device, drawn there: DeepSeek-V4's experts are 12.9 GB in bf16, and an
    # fp32 copy or a CPU draw of them would take longer than the benchmark.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device(device):
            module = experts_cls(config.get_text_config())
    finally:
        torch.set_default_dtype(default_dtype)
    hidden, inter = shape[0], shape[1]
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param_name, param in module.named_parameters():
            if param_name.startswith("gate_up"):
                # Pre-activations with std ~ the clamp limit: a good share of them pass it.
                std = limit / hidden**0.5 if "bias" not in param_name else 1.0
            else:
                std = inter**-0.5 if "bias" not in param_name else 1.0
            param.normal_(0.0, std, generator=gen)
    return module, shape


def _experts_class(model_type: str) -> type[torch.nn.Module]:
    import importlib

    from padd.moe.experts_plan import is_experts_module

    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    for value in vars(modeling).values():
        if isinstance(value, type) and value.__name__.endswith("Experts") and hasattr(value, "_apply_gate"):
            with torch.device("meta"):
                try:
                    probe = value(AutoConfig.for_model(model_type).get_text_config())
                except Exception:
                    continue
            if is_experts_module(probe):
                return value
    raise LookupError(f"no experts class in transformers.models.{model_type}")


class Problem:
    """Input, top-k decisions and output gradient for one T."""

    def __init__(self, num_tokens: int, hidden: int, num_experts: int, top_k: int):
        gen = torch.Generator(device="cpu").manual_seed(1)
        device = bench_device()
        self.x_TH = torch.randn(num_tokens, hidden, generator=gen).to(device, DTYPE)
        logits_TE = torch.randn(num_tokens, num_experts, generator=gen)
        weights_TK, ids_TK = logits_TE.softmax(-1).topk(top_k, dim=-1)
        self.ids_TK = ids_TK.to(device)
        self.weights_TK = (weights_TK / weights_TK.sum(-1, keepdim=True)).to(device, DTYPE)
        self.grad_TH = torch.randn(num_tokens, hidden, generator=gen).to(device, DTYPE)


def _implementations(module: torch.nn.Module) -> dict:
    grouped_mm = ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    eager = family_eager_forward(module)
    if eager is None:
        raise LookupError(f"{type(module).__name__}: no wrapped eager forward")
    return {
        "padd": padd_experts_forward,
        "transformers grouped_mm": grouped_mm,
        "transformers eager": eager,
    }


def _check_against_eager(module, impls, p: Problem) -> float:
    with torch.no_grad():
        ref = impls["transformers eager"](module, p.x_TH, p.ids_TK, p.weights_TK).float()
        out = impls["padd"](module, p.x_TH, p.ids_TK, p.weights_TK).float()
    rel = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
    tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
    assert rel < tol, f"padd differs from the family's eager forward: relative {rel:.2e} > {tol:.0e}"
    return rel


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    report_suite(SUITE, _RECORDS, [])


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("name", NAMES)
def test_bench_variant(name: str, num_tokens: int) -> None:
    if name not in VARIANTS:
        raise ValueError(f"PADD_BENCH_MODELS: unknown {name!r}; known: {sorted(VARIANTS)}")
    module, (hidden, inter, num_experts, top_k) = build_experts(name)
    plan = plan_experts(module)
    assert plan.fused, f"{name}: padd would run its general path ({plan.why})"
    p = Problem(num_tokens, hidden, num_experts, top_k)
    impls = _implementations(module)
    rel = _check_against_eager(module, impls, p)
    params = [t for t in module.parameters()]
    shape = {"model": name, "T": num_tokens, "H": hidden, "I": inter, "E": num_experts, "k": top_k,
             "dtype": str(DTYPE).removeprefix("torch."), "activation": plan.activation.name}  # fmt: skip
    flops = moe_ffn_flops(num_tokens, top_k, hidden, inter)
    for op, op_flops in (("fwd", flops), ("fwd_bwd", 3 * flops)):
        fns = {}
        for impl, fn in impls.items():
            if op == "fwd":

                def run(fn=fn):
                    with torch.no_grad():
                        return fn(module, p.x_TH, p.ids_TK, p.weights_TK)
            else:
                leaves = [t.detach().clone().requires_grad_() for t in (p.x_TH, p.weights_TK)]

                def run(fn=fn, leaves=leaves):
                    out = fn(module, leaves[0], p.ids_TK, leaves[1])
                    return torch.autograd.grad(out, leaves + params, p.grad_TH, allow_unused=True)

            fns[impl] = run
        timings = time_interleaved(fns, **_REPS)
        records = {}
        for impl, timing in timings.items():
            if isinstance(timing, Exception):
                print(f"  {name} T={num_tokens} {op}: {impl} failed: {type(timing).__name__}: {timing}")
                continue
            label = impl if on_gpu() or impl != "padd" else "padd (reference)"
            records[impl] = make_record(SUITE, f"experts_{op}", label, shape, timing, flops=op_flops)
        if "padd" in records and "transformers grouped_mm" in records:
            ratio = records["transformers grouped_mm"].median_ms / records["padd"].median_ms
            records["padd"].extra.update(speedup_vs_grouped_mm=ratio, rel_err_vs_eager=rel)
            print(f"  {name:<12} T={num_tokens:<6} {op:<8} padd {ratio:5.2f}x grouped_mm (rel err {rel:.1e})")
        _RECORDS.extend(records.values())
        write_if_requested(SUITE, _RECORDS)
