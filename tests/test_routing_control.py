"""RoutingControl on tiny random Mixtral / Qwen3-MoE / OLMoE / Qwen2-MoE models."""

import pytest
import torch
from moe_tiny_models import ARCHS, NUM_EXPERTS, TOP_K, VOCAB, tiny_model

from padd.moe.routing_control import BIAS_FILENAME, RoutingControl


def _hf_router(router, hidden_TH):
    """The router's own output, bypassing its hooks."""
    return type(router).forward(router, hidden_TH)


def _ids(batch=2, seq=6):
    # batch·seq·K = 24 slots, a multiple of E = 6: uniform routing gives equal loads.
    return torch.randint(3, VOCAB, (batch, seq))


@pytest.mark.parametrize("arch", ARCHS)
def test_learned_zero_bias_reproduces_hf_routing_exactly(arch):
    model = tiny_model(arch)
    ids = _ids()
    ref_logits = model(ids).logits
    control = RoutingControl(model)
    assert (control.num_layers, control.num_experts, control.top_k) == (2, NUM_EXPERTS, TOP_K)
    assert control.norm_topk_prob == (arch in ("mixtral", "qwen3_moe"))
    assert control.selection_bias.dtype == torch.float32
    assert torch.equal(control.selection_bias, torch.zeros(2, NUM_EXPERTS))
    for router in control.routers:
        hidden_TH = torch.randn(10, 32)
        ref = _hf_router(router, hidden_TH)
        got = router(hidden_TH)
        for r, g in zip(ref, got, strict=True):
            assert r.dtype == g.dtype and torch.equal(r, g)
    assert torch.equal(model(ids).logits, ref_logits)
    control.remove()


def test_ties_resolve_to_lower_expert_id():
    model = tiny_model("qwen3_moe")
    control = RoutingControl(model)
    with torch.no_grad():
        control.routers[0].weight.zero_()  # every logit tied
    _, weights_TK, experts_TK = control.routers[0](torch.randn(5, 32))
    assert experts_TK.tolist() == [[0, 1]] * 5
    assert torch.equal(weights_TK, torch.full((5, TOP_K), 0.5))
    control.remove()


def test_learned_gradients_match_hf():
    model = tiny_model("qwen3_moe")
    ids = _ids()
    grad_out = torch.randn(2, 6, VOCAB)
    (model(ids).logits * grad_out).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    control = RoutingControl(model)
    (model(ids).logits * grad_out).sum().backward()
    for name, param in model.named_parameters():
        if name in ref:
            # fp32: padd renormalises from the logits, HF from its softmax; ~1e-6 apart.
            torch.testing.assert_close(param.grad, ref[name], rtol=1e-4, atol=1e-5, msg=name)
    assert control.routers[0].weight.grad.abs().sum() > 0
    control.remove()


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_bias_changes_selection_but_not_weight_source(arch):
    model = tiny_model(arch)
    control = RoutingControl(model)
    router = control.routers[0]
    hidden_TH = torch.randn(12, 32)
    logits_TE = _hf_router(router, hidden_TH)[0]
    control.selection_bias[0, 4] = 100.0  # in place, as the trainer does
    _, weights_TK, experts_TK = router(hidden_TH)
    assert (experts_TK[:, 0] == 4).all()
    assert not torch.equal(experts_TK, _hf_router(router, hidden_TH)[2])
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    expected = probs_TE.gather(1, experts_TK)
    if control.norm_topk_prob:
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(weights_TK.float(), expected)
    # Layer 1 keeps its zero bias, hence HF routing.
    hidden2 = torch.randn(12, 32)
    assert torch.equal(control.routers[1](hidden2)[2], _hf_router(control.routers[1], hidden2)[2])
    control.remove()


def test_uniform_mode_equal_loads_weights_one_over_k_no_router_grad():
    model = tiny_model("qwen3_moe").train()
    control = RoutingControl(model, mode="uniform", capture=True)
    out = model(_ids())
    for experts_TK in control.selected_experts:
        counts = torch.bincount(experts_TK.reshape(-1), minlength=NUM_EXPERTS)
        assert counts.tolist() == [2 * 6 * TOP_K // NUM_EXPERTS] * NUM_EXPERTS
        t, j = 5, 1
        assert experts_TK[t, j] == (t * TOP_K + j) % NUM_EXPERTS
    _, weights_TK, _ = control.routers[0](torch.randn(7, 32))
    assert torch.equal(weights_TK, torch.full((7, TOP_K), 1.0 / TOP_K))
    (out.logits * torch.randn_like(out.logits)).sum().backward()
    for router in control.routers:
        assert router.weight.grad is None or not router.weight.grad.any()
    # The router's logits still carry a graph (for the L_init loss).
    assert all(z.requires_grad for z in control.router_logits)


def test_uniform_routing_ignores_router_parameters():
    model = tiny_model("mixtral")
    ids = _ids()
    control = RoutingControl(model)
    with control.uniform():
        before = model(ids).logits
        with torch.no_grad():
            for router in control.routers:
                router.weight.normal_()
        assert torch.equal(model(ids).logits, before)
    assert control.mode == "learned"
    assert not torch.equal(model(ids).logits, before)
    control.remove()


def test_capture_returns_per_layer_logits_with_grad():
    model = tiny_model("olmoe")
    control = RoutingControl(model)
    model(_ids())
    assert control.router_logits == [None, None]  # capture is off by default
    with control.capturing():
        model(_ids(batch=3, seq=4))
    assert not control.capture
    assert len(control.router_logits) == len(control.selected_experts) == 2
    for z, e in zip(control.router_logits, control.selected_experts, strict=True):
        assert z.shape == (12, NUM_EXPERTS) and z.requires_grad
        assert e.shape == (12, TOP_K) and e.dtype == torch.int64
    probs = control.router_probs()
    torch.testing.assert_close(probs[1].sum(-1), torch.ones(12))
    sum(p.square().sum() for p in probs).backward()
    assert all(r.weight.grad is not None and r.weight.grad.any() for r in control.routers)
    control.clear()
    assert control.router_logits == [None, None] and control.selected_experts == [None, None]
    control.remove()


@pytest.mark.parametrize("mode", ["learned", "uniform"])
def test_generate_with_kv_cache(mode):
    model = tiny_model("qwen2_moe")
    ids = _ids(batch=2, seq=5)
    kwargs = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    ref = model.generate(ids, **kwargs)
    control = RoutingControl(model, mode=mode, capture=True)
    out = model.generate(ids, **kwargs)
    assert out.shape == ref.shape
    if mode == "learned":
        assert torch.equal(out, ref)
    # The last router call was one decoding step: T = batch.
    assert control.router_logits[0].shape == (2, NUM_EXPERTS)
    assert control.selected_experts[1].shape == (2, TOP_K)
    control.remove()


def test_any_leading_shape():
    model = tiny_model("mixtral")
    control = RoutingControl(model, capture=True)
    logits, weights, experts = control.routers[0](torch.randn(2, 3, 32))
    assert logits.shape == (6, NUM_EXPERTS) and experts.shape == weights.shape == (6, TOP_K)
    assert control.router_logits[0].shape == (6, NUM_EXPERTS)
    control.remove()


def test_selection_bias_save_load_round_trip(tmp_path):
    model = tiny_model("qwen3_moe")
    control = RoutingControl(model)
    control.selection_bias.copy_(torch.randn(2, NUM_EXPERTS))
    path = control.save_selection_bias(tmp_path)
    assert path.endswith(BIAS_FILENAME) and (tmp_path / BIAS_FILENAME).is_file()
    other = RoutingControl(tiny_model("qwen3_moe", seed=1))
    held = other.selection_bias
    other.load_selection_bias(tmp_path)
    assert other.selection_bias is held  # loaded in place: references stay valid
    assert torch.equal(other.selection_bias, control.selection_bias)
    control.remove()
    other.remove()


def test_remove_restores_hf_routing():
    model = tiny_model("qwen3_moe")
    ids = _ids()
    ref = model(ids).logits
    control = RoutingControl(model)
    control.selection_bias.fill_(0.0)[:, 0] = 100.0
    assert not torch.equal(model(ids).logits, ref)
    control.remove()
    assert torch.equal(model(ids).logits, ref)
    control.remove()  # idempotent


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no transformers MoE router"):
        RoutingControl(torch.nn.Linear(4, 4))
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="mode must be one of"):
        RoutingControl(model, mode="random")
    control = RoutingControl(model)
    with pytest.raises(ValueError, match="mode must be one of"):
        control.mode = "greedy"
    with pytest.raises(ValueError, match=r"shape \[L, E\]"):
        control.selection_bias = torch.zeros(NUM_EXPERTS)
    with pytest.raises(TypeError, match="torch.Tensor"):
        control.selection_bias = [[0.0] * NUM_EXPERTS] * 2
    with pytest.raises(FileNotFoundError):
        control.load_selection_bias(tmp_path)
    bigger = RoutingControl(tiny_model("mixtral"))
    bigger.num_layers = 3  # pretend a deeper model wrote it
    bigger._selection_bias = torch.zeros(3, NUM_EXPERTS)
    bigger.save_selection_bias(tmp_path)
    with pytest.raises(ValueError, match="this model needs"):
        control.load_selection_bias(tmp_path)
    control.remove()
    bigger.remove()


def _deepseek_v3():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "deepseek_v3", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, first_k_dense_replace=0, moe_intermediate_size=16,
        n_shared_experts=1, routed_scaling_factor=2.5, q_lora_rank=None, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_a_router_it_would_change_is_refused_at_setup():
    """DeepSeek-V3's sigmoid, grouped, scaled router: softmax re-routing would change the model,
    so RoutingControl refuses it (one line) instead of steering it."""
    from padd.moe.routing_control import check_routers

    model = _deepseek_v3()
    refusal = r"^RoutingControl re-routes by softmax top-k; model\.layers\.0\.mlp\.gate"
    with pytest.raises(ValueError, match=refusal):
        RoutingControl(model)
    with pytest.raises(ValueError, match="routes otherwise"):
        check_routers(model)


def test_a_pretrained_student_of_an_unsupported_family_fails_before_stage_one(monkeypatch):
    from dense_tiny_models import tiny_teacher

    import padd.decompress.pretrained as pretrained

    monkeypatch.setattr(pretrained, "cluster_teacher", lambda *a, **k: pytest.fail("clustering ran"))
    with pytest.raises(ValueError, match="routes otherwise"):
        pretrained.init_pretrained_student(_deepseek_v3(), tiny_teacher("llama"), [])
