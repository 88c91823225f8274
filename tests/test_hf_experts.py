"""experts_implementation="padd" in transformers: tiny saved-and-reloaded models vs "eager"."""

import copy

import pytest
import torch
from moe_tiny_models import ARCHS, VOCAB, saved_tiny_model
from transformers import AutoModelForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import padd  # noqa: F401  (registers "padd")
from padd.moe import hf_experts
from padd.moe.routing_control import RoutingControl
from padd.pipeline.inputs import load_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> directory of a tiny random model written by save_pretrained."""
    root = tmp_path_factory.mktemp("tiny_moe")
    return {arch: saved_tiny_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture
def padd_calls(monkeypatch):
    """Counts calls into padd's experts kernel, to prove the registry routed through it."""
    calls = []
    real = hf_experts.moe_ffn

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_experts, "moe_ffn", spy)
    return calls


def _load(path, impl, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, experts_implementation=impl, **kwargs)


def _forward_backward(model, ids, grad_out):
    logits = model(ids).logits
    (logits * grad_out).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_padd_is_registered():
    assert "padd" in ALL_EXPERTS_FUNCTIONS.valid_keys()
    assert ALL_EXPERTS_FUNCTIONS["padd"] is hf_experts.padd_experts_forward
    hf_experts.register()  # idempotent
    assert ALL_EXPERTS_FUNCTIONS["padd"] is hf_experts.padd_experts_forward


@pytest.mark.parametrize("arch", ARCHS)
def test_from_pretrained_padd_matches_eager_forward_and_backward(arch, saved, padd_calls):
    eager = _load(saved[arch], "eager")
    model = _load(saved[arch], "padd")
    assert model.config._experts_implementation == "padd"
    ids = torch.randint(3, VOCAB, (2, 7))
    grad_out = torch.randn(2, 7, VOCAB)
    ref_logits, ref_grads = _forward_backward(eager, ids, grad_out)
    logits, grads = _forward_backward(model, ids, grad_out)
    assert padd_calls == [(14, 32)] * 2  # one call per MoE layer, T = batch·seq
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any("experts.gate_up_proj" in n for n in grads) and any("gate.weight" in n for n in grads)


def test_set_experts_implementation_padd(saved, padd_calls):
    model = _load(saved["qwen3_moe"], "eager")
    ids = torch.randint(3, VOCAB, (1, 9))
    ref = model(ids).logits
    assert padd_calls == []
    model.set_experts_implementation("padd")
    assert model.config._experts_implementation == "padd"
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert len(padd_calls) == 2
    model.set_experts_implementation("eager")
    model(ids)
    assert len(padd_calls) == 2


def test_bf16_model(saved, padd_calls):
    ids = torch.randint(3, VOCAB, (2, 6))
    eager = _load(saved["mixtral"], "eager", dtype=torch.bfloat16)
    model = _load(saved["mixtral"], "padd", dtype=torch.bfloat16)
    logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and padd_calls
    torch.testing.assert_close(logits.float(), eager(ids).logits.float(), rtol=3e-2, atol=3e-2)


def test_generate_with_routing_control(saved, padd_calls):
    model = _load(saved["olmoe"], "padd")
    eager = _load(saved["olmoe"], "eager")
    ids = torch.randint(3, VOCAB, (2, 4))
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    control = RoutingControl(model, mode="uniform")
    eager_control = RoutingControl(eager, mode="uniform")
    assert torch.equal(model.generate(ids, **kwargs), eager.generate(ids, **kwargs))
    assert padd_calls[-1] == (2, 32)  # a decoding step: T = batch
    control.remove()
    eager_control.remove()


def test_experts_compile_fullgraph(saved):
    torch._dynamo.reset()
    model = _load(saved["qwen3_moe"], "padd")
    block = model.model.layers[0].mlp
    hidden_TH = torch.randn(10, 32)
    _, weights_TK, experts_TK = block.gate(hidden_TH)
    compiled = torch.compile(block.experts, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(
        compiled(hidden_TH, experts_TK, weights_TK), block.experts(hidden_TH, experts_TK, weights_TK)
    )


def test_unsupported_experts_module_raises():
    class QuantisedExperts(torch.nn.Module):
        has_gate, _is_expert_parallel = True, False
        gate_up_proj = torch.zeros(2, 8, 4, dtype=torch.int8)
        down_proj = torch.zeros(2, 4, 4, dtype=torch.int8)

        def _apply_gate(self, gate_up):
            return gate_up

    refusal = "padd cannot run QuantisedExperts: gate_up_proj is torch.int8"
    with pytest.raises(NotImplementedError, match=refusal):
        hf_experts.padd_experts_forward(
            QuantisedExperts(), torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
        )


def _biased_mixtral(monkeypatch):
    """Mixtral experts that declare biases they do not hold: padd must refuse them at build time."""
    from transformers.models.mixtral import modeling_mixtral

    init = modeling_mixtral.MixtralExperts.__init__

    def declare_bias(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.has_bias = True

    monkeypatch.setattr(modeling_mixtral.MixtralExperts, "__init__", declare_bias)


def test_refused_at_build_and_switch_time_not_at_forward(saved, monkeypatch):
    _biased_mixtral(monkeypatch)
    with pytest.raises(NotImplementedError, match=r"experts: padd cannot run MixtralExperts: has_bias=True"):
        _load(saved["mixtral"], "padd")
    model = _load(saved["mixtral"], "eager")
    with pytest.raises(NotImplementedError, match="has_bias=True but gate_up_proj_bias"):
        model.set_experts_implementation("padd")
    assert model.config._experts_implementation == "eager"  # left as it was
    model(torch.randint(3, VOCAB, (1, 4)))


def test_unknown_implementation_still_rejected(saved):
    with pytest.raises(ValueError, match="padd"):
        _load(saved["mixtral"], "not_an_impl")


def test_program_loader_runs_padd_and_saves_a_plain_checkpoint(saved, padd_calls, tmp_path):
    """`padd train`'s loader puts experts on padd; the saved model reloads on transformers' default."""
    model = load_model(saved["mixtral"])
    assert model.config._experts_implementation == "padd"
    ids = torch.randint(3, VOCAB, (2, 5))
    logits = model(ids).logits
    assert padd_calls == [(10, 32)] * 2
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (
        plain.config._experts_implementation
        == AutoModelForCausalLM.from_pretrained(saved["mixtral"]).config._experts_implementation
        != "padd"
    )
    torch.testing.assert_close(plain(ids).logits, logits, rtol=1e-5, atol=1e-5)
    assert len(padd_calls) == 2  # the plain model never called padd


def test_program_loader_other_implementation(saved, padd_calls):
    model = load_model(saved["qwen2_moe"], experts_implementation="eager")
    model(torch.randint(3, VOCAB, (1, 4)))
    assert model.config._experts_implementation == "eager" and padd_calls == []


def test_use_experts_checks_before_compute(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, intermediate_size=8, num_local_experts=4,
                           hidden_act="gelu")  # fmt: skip
    gelu = MixtralForCausalLM(copy.deepcopy(config))
    ids = torch.randint(3, VOCAB, (1, 5))
    want = gelu(ids).logits
    hf_experts.use_experts(gelu)  # a GELU gate is not fused: the general path runs it exactly
    assert gelu.config._experts_implementation == "padd"
    plan = hf_experts.check_model(gelu)["model.layers.0.mlp.experts"]
    assert not plan.fused and "none of padd's fused activations" in plan.why
    torch.testing.assert_close(gelu(ids).logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="experts_implementation must be one of"):
        hf_experts.use_experts(gelu, "no_such_impl")
    _biased_mixtral(monkeypatch)
    biased = MixtralForCausalLM(config)
    with pytest.raises(NotImplementedError, match="has_bias=True"):
        hf_experts.use_experts(biased)
    assert biased.config._experts_implementation != "padd"
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=8))  # fmt: skip
    before = dense.config._experts_implementation
    assert hf_experts.use_experts(dense) is dense and dense.config._experts_implementation == before


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_expert_parallel_sentinel_contributes_zero(arch):
    """An id equal to E (a token routed to another rank) adds nothing to the output and gets no
    routing-weight gradient, as in transformers' own `batched_mm` backend (the oracle here)."""
    from moe_tiny_models import NUM_EXPERTS, tiny_model
    from transformers.integrations.moe import batched_mm_experts_forward

    experts = tiny_model(arch).model.layers[0].mlp.experts
    experts._is_expert_parallel = True
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(9, experts.gate_up_proj.shape[-1], generator=generator)
    ids = torch.randint(0, NUM_EXPERTS, (9, 2), generator=generator)
    ids[::3, 1] = NUM_EXPERTS  # sentinels, in the second slot of every third token
    ids[4, :] = NUM_EXPERTS  # a token wholly on other ranks
    weights = torch.rand(9, 2, generator=generator)
    outputs, grads = [], []
    for forward in (batched_mm_experts_forward, hf_experts.padd_experts_forward):
        w = weights.clone().requires_grad_()
        out = forward(experts, x, ids, w)
        (g,) = torch.autograd.grad(out.square().sum(), w)
        outputs.append(out.detach())
        grads.append(g)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert outputs[1][4].abs().max() == 0 and (grads[1][ids == NUM_EXPERTS] == 0).all()


def _inkling2_experts(gate_softcap: float = 4.0, up_softcap: float = 25.0):
    """A tiny Inkling2Experts (soft-capped SwiGLU) with weights large enough that both caps act."""
    modeling = pytest.importorskip("transformers.models.inkling2.modeling_inkling2")
    from transformers.models.inkling2.configuration_inkling2 import Inkling2TextConfig

    config = Inkling2TextConfig(hidden_size=16, moe_intermediate_size=8, n_routed_experts=4,
                                mlp_gate_softcap=gate_softcap, mlp_up_softcap=up_softcap)  # fmt: skip
    experts = modeling.Inkling2Experts(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=generator) * 3)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=generator) / 8)
    return experts, modeling


def _padd_vs_transformers(experts, caps: tuple[float, float]) -> None:
    """padd's experts forward against transformers' own `batched_mm` backend (which calls the
    module's `_apply_gate`): output, routing-weight and expert-weight gradients."""
    from transformers.integrations.moe import batched_mm_experts_forward

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(11, 16, generator=generator)
    ids = torch.randint(0, 3, (11, 2), generator=generator)  # expert 3 gets no token
    ids[:, 1] = (ids[:, 0] + 1) % 3
    weights = torch.rand(11, 2, generator=generator)
    gate, up = torch.einsum("eoh,th->teo", experts.gate_up_proj, x).detach().chunk(2, dim=-1)
    assert (gate.abs() > 3 * caps[0]).double().mean() > 0.3  # well past the gate cap
    assert (up.abs() > 3 * caps[1]).double().mean() > 0.2 or caps[1] >= 25  # and the up cap
    results = []
    for forward in (batched_mm_experts_forward, hf_experts.padd_experts_forward):
        w = weights.clone().requires_grad_()
        out = forward(experts, x, ids, w)
        params = [experts.gate_up_proj, experts.down_proj]
        results.append((out.detach(), torch.autograd.grad(out.square().sum(), [w, *params])))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, ref in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_inkling2_softcapped_swiglu_runs_fused_with_the_modules_caps():
    """Inkling2's `Inkling2SoftcappedSwiGLU` is recognised as "swiglu_softcap" with the caps its
    module holds (not the config defaults), and the fused kernels equal transformers' backend."""
    from padd.moe.experts_plan import plan_experts

    experts, _ = _inkling2_experts()
    plan = plan_experts(experts)
    assert plan.fused and plan.activation.name == "swiglu_softcap", plan.why
    assert (plan.activation.gate_softcap, plan.activation.up_softcap) == (4.0, 25.0)
    _padd_vs_transformers(experts, (4.0, 25.0))
    experts.act_fn.gate_softcap.softcap, experts.act_fn.up_softcap.softcap = 1.5, 2.0  # edited in place
    plan = plan_experts(experts)
    assert (plan.activation.gate_softcap, plan.activation.up_softcap) == (1.5, 2.0), plan.why
    _padd_vs_transformers(experts, (1.5, 2.0))


def test_inkling2_caps_the_probe_does_not_confirm_run_the_general_path():
    """A module whose `_apply_gate` computes other caps than its attributes say (or holds no
    caps padd can read) is not fused: the general path runs it, exactly."""
    from padd.moe.experts_plan import plan_experts

    experts, modeling = _inkling2_experts(gate_softcap=1.5, up_softcap=2.0)
    wrong = modeling.Inkling2Softcap(1.5)
    wrong.forward = lambda t: torch.tanh(t / 3.0) * 3.0  # computes cap 3, says 1.5
    experts.act_fn.gate_softcap = wrong
    plan = plan_experts(experts)
    assert not plan.fused and "none of padd's fused activations" in plan.why
    _padd_vs_transformers(experts, (3.0, 2.0))

    experts, _ = _inkling2_experts(gate_softcap=1.5, up_softcap=2.0)
    experts.act_fn.up_softcap.softcap = "2.0"  # not a number padd reads: no candidate, general path
    experts.act_fn.up_softcap.forward = lambda t: torch.tanh(t / 2.0) * 2.0
    plan = plan_experts(experts)
    assert not plan.fused, plan.why
    _padd_vs_transformers(experts, (1.5, 2.0))
