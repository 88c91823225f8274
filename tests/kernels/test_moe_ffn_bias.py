"""moe_ffn's expert biases in the Triton kernels (interpreter on CPU) against the reference.

`gate_up_bias` `[E, 2I]` (`[E, I]` non-gated, in the weight's row layout, interleaved for GPT-OSS)
is added in the gate/up GEMM's epilogue before the activation, `down_bias` `[E, H]` to each
expert's output before the routing weight scales it (`w · (h @ W2 + b2)`, transformers'
GptOssExperts). Every case compares the forward and every gradient (x, both weights, both biases,
the routing weights) with the reference, whose own biased math is checked against dense fp64
loops in test_moe_ffn_activations.py and test_moe_ffn_ungated.py.

Shape legend: T tokens, H hidden, I expert width, E experts, K top_k.
"""

from __future__ import annotations

import pytest
import torch
from offline_compile import GROUPED_GEMM_SM90_PRELUDE, assert_compiles_offline_for_sm90
from padd.kernels import Routing, moe_ffn, route, routing_from_topk
from padd.kernels.grouped_gemm import triton as moe_triton

TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 2e-2, "rtol": 2e-2},
    torch.bfloat16: {"atol": 5e-2, "rtol": 5e-2},
}
GPT_OSS = dict(activation="gpt_oss", limit=7.0, alpha=1.702, gate_up_interleaved=True)
# Inkling2's soft-capped SwiGLU, caps small enough that the 4x pre-activations (bias included)
# reach several times them.
SOFTCAP = dict(activation="swiglu_softcap", gate_softcap=1.5, up_softcap=1.75)
NAMES = ["x", "gate_up_proj", "down_proj", "weights", "gate_up_bias", "down_bias"]

# (name, activation options, which biases, routing, first-weight scale). Routing "empty": expert 3
# gets no token; "tied": `route` on logits with many exact ties (and expert 3 never chosen).
CASES = {
    "swiglu": (dict(activation="swiglu"), (True, True), "empty", 1.0),
    "gpt_oss": (GPT_OSS, (True, True), "empty", 4.0),
    "gpt_oss_tied": (GPT_OSS, (True, True), "tied", 4.0),
    "relu2_up_bias_only": (dict(activation="relu2"), (True, False), "empty", 1.0),
    "swiglu_down_bias_only": (dict(activation="swiglu"), (False, True), "tied", 1.0),
    "gpt_oss_gate_up_bias_only": (GPT_OSS, (True, False), "empty", 4.0),
    "swiglu_softcap": (SOFTCAP, (True, True), "empty", 4.0),
}


def tied_logits(T: int, E: int, seed: int) -> torch.Tensor:
    """`[T, E]` logits in {0, 1}: most tokens tie between several experts; expert 3 never wins."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 2, (T, E), generator=g, device="cpu").float()
    logits[:, 3] = -30.0
    return logits


def _routing(kind: str, T: int, E: int, K: int, seed: int) -> Routing:
    if kind == "tied":
        return route(tied_logits(T, E, seed), K, backend="reference")
    g = torch.Generator().manual_seed(seed + 1)
    pool = torch.tensor([e for e in range(E) if e != 3], device="cpu")
    experts_TK = pool[torch.rand(T, pool.numel(), generator=g, device="cpu").topk(K, dim=1).indices]
    return routing_from_topk(experts_TK, torch.rand(T, K, generator=g, device="cpu"), E)


def make_case(case: str, T=21, H=16, I=8, E=5, K=2, dtype=torch.float32, device=None, seed=0, scale=None):
    """x, first weight (`[E, 2I, H]`, `[E, I, H]` non-gated), down weight, biases, Routing; drawn
    on the CPU, then moved to `device` (default: the default device, CUDA on a GPU machine).
    `scale` overrides the case's scale of the first weight and bias."""
    options, (has_b1, has_b2), kind, case_scale = CASES[case]
    scale = case_scale if scale is None else scale
    device = torch.get_default_device() if device is None else torch.device(device)
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, device="cpu")
    width = I if options["activation"] == "relu2" else 2 * I
    x = randn(T, H)
    w1 = randn(E, width, H) * (scale / H**0.5)
    w2 = randn(E, H, I) / I**0.5
    b1 = randn(E, width) * scale if has_b1 else None
    b2 = randn(E, H) if has_b2 else None
    routing = _routing(kind, T, E, K, seed).__dict__
    routing = Routing(
        **{k: v.detach().to(device) if isinstance(v, torch.Tensor) else v for k, v in routing.items()}
    )
    cast = lambda t: None if t is None else t.to(device, dtype)
    return cast(x), cast(w1), cast(w2), cast(b1), cast(b2), routing, options


def _grad_like(x: torch.Tensor, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g, device="cpu").to(x.device, x.dtype)


def fwd_bwd(x, w1, w2, b1, b2, routing, options, backend, grad):
    """Output and the gradients of (x, w1, w2, weights, b1, b2), None for an absent bias."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, routing.weights)]
    biases = [None if b is None else b.detach().clone().requires_grad_() for b in (b1, b2)]
    r = Routing(**{**routing.__dict__, "weights": leaves[3]})
    out = moe_ffn(*leaves[:3], r, gate_up_bias=biases[0], down_bias=biases[1], backend=backend, **options)
    wrt = [*leaves, *[b for b in biases if b is not None]]
    grads = iter(torch.autograd.grad(out, wrt, grad))
    grads = [next(grads) for _ in leaves] + [None if b is None else next(grads) for b in biases]
    return out, grads


def assert_same(got, want, dtype):
    out, grads = got
    out_ref, grads_ref = want
    torch.testing.assert_close(out.float(), out_ref.float(), **TOL[dtype])
    for label, g, g_ref in zip(NAMES, grads, grads_ref, strict=True):
        assert (g is None) == (g_ref is None), label
        if g is not None:
            assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, label
            torch.testing.assert_close(g.float(), g_ref.float(), **TOL[dtype], msg=label)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_biases_match_reference(case, dtype):
    x, w1, w2, b1, b2, r, options = make_case(case, dtype=dtype)
    grad = _grad_like(x)
    got = fwd_bwd(x, w1, w2, b1, b2, r, options, "triton", grad)
    want = fwd_bwd(x, w1, w2, b1, b2, r, options, "reference", grad)
    assert got[0].dtype == dtype
    assert_same(got, want, dtype)


def test_cases_reach_what_they_claim():
    """GPT-OSS's gate/up pre-activations (bias included) pass the clamp on a good share of
    entries; the routings leave expert 3 empty and the "tied" logits really tie."""
    x, w1, _, b1, _, r, _ = make_case("gpt_oss")
    pre = torch.einsum("eoh,th->teo", w1, x) + b1
    assert (pre.abs() > 7.0).double().mean() > 0.2
    x, w1, _, b1, _, _, options = make_case("swiglu_softcap")
    gate, up = (torch.einsum("eoh,th->teo", w1, x) + b1).chunk(2, dim=-1)
    assert (gate.abs() > 3 * options["gate_softcap"]).double().mean() > 0.3
    assert (up.abs() > 3 * options["up_softcap"]).double().mean() > 0.3
    for case in ("gpt_oss", "gpt_oss_tied", "swiglu_down_bias_only", "swiglu_softcap"):
        assert make_case(case)[5].tokens_per_expert[3] == 0
    logits = tied_logits(21, 5, 0)
    ties = (logits == logits.max(dim=1, keepdim=True).values).sum(dim=1)
    assert (ties > 2).double().mean() > 0.3  # K = 2 of 3 or 4 equal logits: the tie-break decides


def test_triton_biases_with_a_transposed_weight_view():
    """GPT-OSS stores `[E, H, 2I]` / `[E, I, H]`: the kernels take the transposed views as they are."""
    x, w1, w2, b1, b2, r, options = make_case("gpt_oss", seed=1)
    w1_t = w1.transpose(1, 2).contiguous().transpose(1, 2)
    w2_t = w2.transpose(1, 2).contiguous().transpose(1, 2)
    grad = _grad_like(x)
    got = fwd_bwd(x, w1_t, w2_t, b1, b2, r, options, "triton", grad)
    want = fwd_bwd(x, w1, w2, b1, b2, r, options, "reference", grad)
    assert_same(got, want, torch.float32)


def test_triton_bias_dtype_may_differ():
    """fp32 biases beside fp16 weights (as autocast leaves them): gradients come back in fp32."""
    x, w1, w2, b1, b2, r, options = make_case("gpt_oss", dtype=torch.float16, seed=2)
    b1, b2 = b1.float(), b2.float()
    grad = _grad_like(x)
    got = fwd_bwd(x, w1, w2, b1, b2, r, options, "triton", grad)
    want = fwd_bwd(x, w1, w2, b1, b2, r, options, "reference", grad)
    assert got[1][4].dtype == got[1][5].dtype == torch.float32
    assert_same(got, want, torch.float16)


def test_triton_biases_frozen_weights():
    """Only x and the biases need gradients: the weight-gradient kernels are skipped; dx and the
    bias gradients still match."""
    x, w1, w2, b1, b2, r, options = make_case("swiglu", seed=3)
    grad = _grad_like(x)
    _, want = fwd_bwd(x, w1, w2, b1, b2, r, options, "reference", grad)
    leaves = [t.clone().requires_grad_() for t in (x, b1, b2)]
    out = moe_ffn(x=leaves[0], gate_up_proj=w1, down_proj=w2, routing=r, gate_up_bias=leaves[1],
                  down_bias=leaves[2], backend="triton", **options)  # fmt: skip
    got = torch.autograd.grad(out, leaves, grad)
    for label, g, g_ref in zip(["x", "gate_up_bias", "down_bias"], got, [want[0], *want[4:]], strict=True):
        torch.testing.assert_close(g, g_ref, **TOL[torch.float32], msg=label)


def test_triton_biases_write_every_element_and_are_deterministic(monkeypatch):
    """Kernel buffers prefilled with NaN (an unwritten element, such as an empty expert's bias
    gradient, shows up), and two runs equal bit for bit (no atomics)."""
    nan_empty = lambda *shape, device, dtype: torch.full(shape, float("nan"), device=device, dtype=dtype)
    monkeypatch.setattr(moe_triton, "_empty", nan_empty)
    x, w1, w2, b1, b2, r, options = make_case("gpt_oss", T=33, seed=4)
    grad = _grad_like(x)
    first, second = (fwd_bwd(x, w1, w2, b1, b2, r, options, "triton", grad) for _ in range(2))
    for a, b in zip((first[0], *first[1]), (second[0], *second[1]), strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    assert torch.equal(first[1][4][3], torch.zeros_like(b1[3]))  # expert 3 has no token
    assert torch.equal(first[1][5][3], torch.zeros_like(b2[3]))


def test_triton_biases_empty_batch():
    x, w1, w2, b1, b2, _, options = make_case("gpt_oss")
    r = routing_from_topk(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2), w1.shape[0])
    out, grads = fwd_bwd(x[:0], w1, w2, b1, b2, r, options, "triton", torch.zeros(0, x.shape[1]))
    assert out.shape == (0, x.shape[1])
    assert torch.equal(grads[4], torch.zeros_like(b1)) and torch.equal(grads[5], torch.zeros_like(b2))


def test_custom_op_schema_with_biases_on_triton():
    """`torch.library.opcheck` (schema, fake tensor) of the biased op with `use_triton=True`."""
    x, w1, w2, b1, b2, r, _ = make_case("gpt_oss", T=6)
    fields = (r.weights, r.expert_ids, r.tokens_per_expert, r.expert_offsets, r.sort_order, r.inverse_order)
    args = (x, w1, w2, *fields, b1, b2, "gpt_oss", 7.0, 1.702, None, None, True, True)
    torch.library.opcheck(torch.ops.padd.moe_ffn.default, args, test_utils=("test_schema", "test_faketensor"))


_SM90_COMPILE = (
    GROUPED_GEMM_SM90_PRELUDE
    + """
tile = dict(BLOCK_E=8, DOT_PRECISION="tf32", BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
for name in ("gpt_oss", "swiglu_softcap", "relu2"):
    code = gt._ACTIVATION_CODES[name]
    gated = code < gt._FIRST_UNGATED
    act = dict(ACTIVATION=code, GATE_STEP=2 if gated else 1, GATED=gated, HAS_BIAS=True, TOP_K=2)
    compile_sm90(gt._gate_up_swiglu_kernel.fn, {**act, **tile}, warps=4)
    compile_sm90(gt._swiglu_backward_kernel.fn, {**act, **tile}, warps=4)
compile_sm90(gt._scatter_down_kernel.fn, dict(HAS_SCALE=True, HAS_BIAS=True, **tile))
for gather, scale, dot in ((True, True, True), (False, False, False)):
    consts = dict(GATHER=gather, HAS_SCALE=scale, HAS_DOT=dot, TOP_K=2, BLOCK_P=32, BLOCK_N=128)
    compile_sm90(gt._expert_bias_grad_kernel, consts, warps=4)
print("compiled")
"""
)


def test_bias_kernels_compile_for_h100_without_a_gpu():
    """The interpreter skips Triton's code generator: lower the biased variants of the gate/up
    and backward kernels (GPT-OSS, Inkling2's soft caps, relu²), the down kernel and the
    bias-gradient kernel to sm_90 offline (bf16)."""
    assert_compiles_offline_for_sm90(_SM90_COMPILE)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_triton_biases_bf16_gpu(case, monkeypatch):
    """bf16 on a GPU: `backend="auto"` runs the biased call on the Triton kernels (counted), and
    matches the reference, forward and every gradient, at a larger shape than the interpreter's
    (several row tiles per expert). Unit-scale pre-activations, as test_moe_ffn's bf16 test: the
    clamps are covered by the fp32 and fp16 cases, which run on the GPU too; at 4x the weight
    gradients' bf16 rounding alone nears the tolerance on their small entries."""
    calls = []
    forward = moe_triton.moe_ffn_triton_forward
    monkeypatch.setattr(
        moe_triton, "moe_ffn_triton_forward", lambda *a, **k: calls.append(1) or forward(*a, **k)
    )
    x, w1, w2, b1, b2, r, options = make_case(case, T=129, H=72, I=40, dtype=torch.bfloat16, device="cuda",
                                              scale=1.0)  # fmt: skip
    grad = _grad_like(x)
    got = fwd_bwd(x, w1, w2, b1, b2, r, options, "auto", grad)
    assert calls, "backend='auto' did not run the Triton kernels"
    want = fwd_bwd(x, w1, w2, b1, b2, r, options, "reference", grad)
    assert_same(got, want, torch.bfloat16)
