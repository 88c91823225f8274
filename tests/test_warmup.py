"""Stage I warmup (uniform frozen routing, L_LM + α·L_KD + β·L_init) and the pre-trained-student
router fit."""

import pytest
import torch
from dense_tiny_models import tiny_teacher, token_batches
from transformers import AutoModelForCausalLM, OlmoeConfig, Qwen3MoeConfig

from padd.decompress import collect_stats, decompress, init_pretrained_student, moe_blocks, warmup
from padd.decompress.stats import ClusterScoreHooks
from padd.decompress.warmup import warmup_losses
from padd.moe.routing_control import RoutingControl


def _confident_teacher():
    """A tiny teacher with a sharp output distribution (its own argmax is a fair label)."""
    teacher = tiny_teacher("llama")
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8)
    return teacher


def _teacher_labelled(teacher, batches):
    for b in batches:
        with torch.no_grad():
            b["labels"] = teacher(b["input_ids"]).logits.argmax(-1).roll(1, dims=1)
    return batches


def _eval_losses(student, teacher, batches, clusters):
    with (
        torch.no_grad(),
        RoutingControl(student, mode="uniform", capture=True) as control,
        ClusterScoreHooks(teacher, clusters) as targets,
    ):
        per = [warmup_losses(student, teacher, b, control, targets) for b in batches]
    return {k: sum(float(p[k]) for p in per) / len(per) for k in ("kd", "init")}


def test_warmup_lowers_init_and_kd_with_uniform_routing():
    teacher = _confident_teacher()
    stats = collect_stats(teacher, token_batches(), num_experts=4)
    student = decompress(teacher, 4, 2, stats)
    batches = _teacher_labelled(teacher, token_batches(2, seed=1))
    router_before = moe_blocks(student)[0].gate.weight.detach().clone()
    before = _eval_losses(student, teacher, batches, stats.clusters)
    history = warmup(student, teacher, batches, stats.clusters, steps=8, lr=1e-3)
    after = _eval_losses(student, teacher, batches, stats.clusters)
    assert len(history) == 8 and {"loss", "lm", "kd", "init", "grad_norm", "load_cv"} <= set(history[0])
    assert after["init"] < before["init"]
    assert after["kd"] < before["kd"]
    # Routing stayed uniform (every expert got the same number of slots at every step) while
    # the router parameters learned from L_init.
    assert all(h["load_cv"] == 0.0 for h in history)
    assert not torch.equal(moe_blocks(student)[0].gate.weight, router_before)
    # The hooks are gone: the student routes with its router again.
    assert not any(b.gate._forward_hooks for b in moe_blocks(student))


def test_uniform_routing_ignores_router():
    teacher = tiny_teacher("qwen3")
    student = decompress(teacher, 4, 2)
    ids = token_batches(1)[0]["input_ids"]
    with RoutingControl(student, mode="uniform", capture=True) as control, torch.no_grad():
        student(ids)
        first = [e.clone() for e in control.selected_experts]
        for b in moe_blocks(student):
            b.gate.weight.normal_()
        student(ids)
    assert all(torch.equal(a, b) for a, b in zip(first, control.selected_experts, strict=True))


def test_warmup_rejects_mismatched_clusters():
    teacher = tiny_teacher("llama")
    student = decompress(teacher, 4, 2)
    other = collect_stats(teacher, token_batches(1), num_experts=8).clusters
    with pytest.raises(ValueError, match="clusters cover"):
        warmup(student, teacher, token_batches(1), other, steps=1)
    with pytest.raises(ValueError, match="steps must be"):
        warmup(student, teacher, token_batches(1), other, steps=0)


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_pretrained_student_router_fit_and_warmup(arch):
    """Paper setting: a pre-trained MoE with another hidden size and depth."""
    teacher = tiny_teacher("qwen2", num_hidden_layers=3)
    common = dict(vocab_size=64, num_experts=4, num_experts_per_tok=2, num_attention_heads=4,
                  num_key_value_heads=2)  # fmt: skip
    if arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(**common, hidden_size=48, intermediate_size=32, moe_intermediate_size=16,
                             num_hidden_layers=2, head_dim=12)  # fmt: skip
    else:
        cfg = OlmoeConfig(**common, hidden_size=24, intermediate_size=16, num_hidden_layers=4,
                          eos_token_id=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(cfg)
    experts_before = moe_blocks(student)[0].experts.gate_up_proj.detach().clone()
    res = init_pretrained_student(student, teacher, token_batches(3))
    layers = cfg.num_hidden_layers
    assert [c.teacher_layer for c in res.clusters.layers] == [l * 3 // layers for l in range(layers)]
    for c in res.clusters.layers:
        assert torch.bincount(c.assignment_F, minlength=4).tolist() == [16] * 4
    # Least squares beats the original router at predicting the teacher's cluster scores.
    assert all(a < b for a, b in zip(res.mse_after, res.mse_before, strict=True))
    assert all(0.0 < r <= 1.0 for r in res.r2)
    assert moe_blocks(student)[0].gate.weight.shape == (4, cfg.hidden_size)
    assert torch.equal(moe_blocks(student)[0].experts.gate_up_proj, experts_before)
    history = warmup(student, teacher, token_batches(1, seed=2), res.clusters, steps=2, lr=1e-3)
    assert all(h["load_cv"] == 0.0 and torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_pretrained_student_errors():
    teacher = tiny_teacher("llama")
    with pytest.raises(ValueError, match="no transformers MoE block"):
        init_pretrained_student(tiny_teacher("qwen2"), teacher, token_batches(1))
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=16, moe_intermediate_size=8,
                         num_experts=3, num_experts_per_tok=1, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1)  # fmt: skip
    with pytest.raises(ValueError, match="not divisible"):
        init_pretrained_student(AutoModelForCausalLM.from_config(cfg), teacher, token_batches(1))


def test_warmup_batches_and_log():
    teacher = tiny_teacher("llama")
    stats = collect_stats(teacher, token_batches(1), num_experts=4)
    student = decompress(teacher, 4, 2, stats)
    seen = []
    # A list shorter than `steps` is gone through again; plain id tensors work.
    history = warmup(
        student, teacher, [token_batches(1)[0]["input_ids"]], stats.clusters, steps=2, log=seen.append
    )
    assert seen == history and [h["step"] for h in history] == [0, 1]
    embed = student.model.embed_tokens.weight.detach().clone()
    router = moe_blocks(student)[1].gate.weight.detach().clone()
    warmup(student, teacher, token_batches(1), stats.clusters, steps=1, trainable="moe")
    assert torch.equal(student.model.embed_tokens.weight, embed)
    assert not torch.equal(moe_blocks(student)[1].gate.weight, router)
    with pytest.raises(ValueError, match="teacher_cache_mb must be >= 0"):
        warmup(student, teacher, token_batches(1), stats.clusters, steps=1, teacher_cache_mb=float("nan"))
    with pytest.raises(ValueError, match="ran out before `steps`"):
        warmup(student, teacher, iter(token_batches(1)), stats.clusters, steps=2)


def _teacher_forwards(teacher) -> list:
    calls: list = []
    teacher.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("targets_kind", ["clusters", "sequence"])
def test_teacher_cache_is_bit_identical_and_runs_the_teacher_once_per_batch(targets_kind):
    from test_router_targets import _problems, _sft_batch
    from test_trainer import char_tokenizer
    from test_trainer import tiny_teacher as char_teacher

    from padd.decompress import fit_sequence_targets

    teacher, tok, problems = char_teacher(), char_tokenizer(), _problems(12)
    batches = [_sft_batch(problems[:6], tok), _sft_batch(problems[6:], tok)]
    if targets_kind == "clusters":
        stats = collect_stats(teacher, batches, num_experts=4)
        clusters, targets, init = stats.clusters, None, "cluster"
    else:
        stats, clusters, init = None, None, "exact"
        targets = fit_sequence_targets(teacher, batches, num_groups=2, group_size=2)
    runs = {}
    for budget in (256.0, 0.0):
        student = decompress(teacher, 4, 2, stats, init=init)
        calls = _teacher_forwards(teacher)
        history = warmup(
            student, teacher, batches, clusters,
            steps=5, lr=1e-2, router_targets=targets, teacher_cache_mb=budget,
        )  # fmt: skip
        teacher.get_decoder()._forward_hooks.clear()
        runs[budget] = (history, student.state_dict(), len(calls))
    (cached, cached_state, cached_calls), (plain, plain_state, plain_calls) = runs[256.0], runs[0.0]
    assert (cached_calls, plain_calls) == (2, 5)  # two distinct batches; five steps without a cache
    assert cached == plain
    assert all(torch.equal(cached_state[k], plain_state[k]) for k in plain_state)
