"""Every transformers MoE family's experts: padd against the family's own eager forward, T=256.

For each family of the installed transformers (discovered as `tests/test_hf_families.py` does,
with the same tiny models: H=64, I=32, E=8) this times one experts module's forward on 256 tokens
with random top-k routing (k the model's own, 2 for most), under `torch.no_grad()`:

- `eager`: the experts class's own forward (the function `@use_experts_implementation` wraps);
- `padd`: `padd_experts_forward`, fused or the general path as the module's plan says.

It prints one line per family with padd's ratio to eager and, at the end, the families where padd
is more than 10% slower. Figures on the CPU are labelled CPU; they are tiny shapes, where
per-call overhead weighs as much as the GEMMs. Run:
`python -m pytest benchmarks/bench_hf_families.py -s` (PADD_BENCH_OUT=DIR writes the JSON).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from common import family_eager_forward, make_record, report_suite, time_fn, write_if_requested

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-model factory
from hf_families import build_tiny_model, discover_families  # noqa: E402

import padd  # noqa: E402, F401  (registers "padd")
from padd.moe.experts_plan import is_experts_module, plan_experts  # noqa: E402
from padd.moe.hf_experts import padd_experts_forward  # noqa: E402

SUITE = "hf_families"
NUM_TOKENS = 256
FAMILIES = discover_families()
_RECORDS: list = []
_SLOW: list[str] = []


def _routing(top_k: int, num_experts: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.rand(NUM_TOKENS, num_experts, generator=generator).topk(top_k, dim=-1).indices
    return ids, torch.rand(NUM_TOKENS, top_k, generator=generator).softmax(dim=-1)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    report_suite(SUITE, _RECORDS, [])
    print(f"padd more than 10% slower than eager: {_SLOW or 'none'}")


@pytest.mark.parametrize("family", FAMILIES, ids=[f.model_type for f in FAMILIES])
def test_bench_experts_forward(family):
    model = build_tiny_model(family, seed=0).eval()
    experts = next(m for m in model.modules() if is_experts_module(m))
    eager = family_eager_forward(experts)
    if eager is None:
        pytest.skip(f"{family.model_type}: no wrapped eager forward found")
    plan = plan_experts(experts)
    generator = torch.Generator().manual_seed(0)
    hidden = plan.layout.hidden
    x = torch.randn(NUM_TOKENS, hidden, generator=generator).to(plan.layout.first_weight(experts).dtype)
    top_k = getattr(model.config.get_text_config(), "num_experts_per_tok", None) or 2
    ids, weights = _routing(top_k, plan.layout.num_experts, generator)
    try:
        with torch.no_grad():
            eager(experts, x, ids, weights)
    except (IndexError, RuntimeError):  # a decorated forward that takes one route per row (ergo)
        top_k = 1
        ids, weights = _routing(top_k, plan.layout.num_experts, generator)
    path = "fused" if plan.fused else "general"
    shape = {"family": family.model_type, "T": NUM_TOKENS, "H": hidden, "I": plan.layout.inter,
             "E": plan.layout.num_experts, "k": top_k, "path": path}  # fmt: skip
    timings = {}
    with torch.no_grad():
        for impl, fn in (("eager", eager), ("padd", padd_experts_forward)):
            timings[impl] = time_fn(lambda fn=fn: fn(experts, x, ids, weights), warmup=3, reps=15)
            _RECORDS.append(make_record(SUITE, "experts_fwd", impl, shape, timings[impl]))
    ratio = timings["eager"]["median_ms"] / timings["padd"]["median_ms"]
    _RECORDS[-1].extra["speedup_vs_eager"] = ratio
    print(f"  {family.model_type:<24} {shape['path']:<8} padd {ratio:5.2f}x eager")
    if ratio < 1 / 1.1:
        _SLOW.append(f"{family.model_type} ({ratio:.2f}x)")
    write_if_requested(SUITE, _RECORDS)
