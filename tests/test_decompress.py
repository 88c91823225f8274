"""Decompression of tiny dense teachers into transformers MoE students (CPU, no downloads)."""

import pytest
import torch
from dense_tiny_models import ARCHS, VOCAB, tiny_dense_config, tiny_teacher, token_batches
from transformers import AutoModelForCausalLM, GPT2Config, MixtralConfig, Qwen2MoeForCausalLM

from padd.decompress import (
    DecompressionError,
    TeacherClusters,
    all_experts_active,
    cluster_teacher,
    collect_stats,
    decompress,
    moe_blocks,
)

# Qwen2-MoE's width-0 shared expert makes torch warn that initialising it is a no-op.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

STUDENT_CLASS = {
    "llama": "MixtralForCausalLM",
    "mistral": "MixtralForCausalLM",
    "qwen2": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3MoeForCausalLM",
}


def _ids(seed=1):
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def _assert_logits_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module", params=ARCHS)
def arch_teacher(request, tmp_path_factory):
    """Each tiny teacher, saved with save_pretrained and reloaded from disk."""
    path = tmp_path_factory.mktemp(request.param)
    tiny_teacher(request.param).save_pretrained(path)
    return request.param, AutoModelForCausalLM.from_pretrained(path).eval()


def test_function_preservation_partition(arch_teacher):
    """Experts partitioning the teacher's neurons, all active at weight 1 = the teacher."""
    arch, teacher = arch_teacher
    student = decompress(teacher, 4, 2, fill=False, rescale="none")
    assert type(student).__name__ == STUDENT_CLASS[arch]
    ids = _ids()
    with torch.no_grad(), all_experts_active(student, weight=1.0):
        _assert_logits_close(student(ids).logits, teacher(ids).logits)
    # Every teacher neuron sits in exactly one expert.
    assert student.config.to_dict().get("num_experts_per_tok") == 2


def test_k_equals_n_reproduces_teacher_with_plain_forward(arch_teacher):
    """With k = N, a uniform router (zero logits) and the expected-output rescale, the plain
    transformers forward equals the teacher: the rescale rule is exact here."""
    _, teacher = arch_teacher
    student = decompress(teacher, 4, 4, router_scale=0.0)
    ids = _ids()
    with torch.no_grad():
        _assert_logits_close(student(ids).logits, teacher(ids).logits)


def test_top1_upcycling_reproduces_teacher(arch_teacher):
    _, teacher = arch_teacher
    student = decompress(teacher, 4, 1, init="upcycle")
    ids = _ids()
    with torch.no_grad():
        _assert_logits_close(student(ids).logits, teacher(ids).logits)


def test_saved_student_reloads_with_plain_transformers(arch_teacher, tmp_path):
    arch, teacher = arch_teacher
    stats = collect_stats(teacher, token_batches(), num_experts=4)
    student = decompress(teacher, 4, 2, stats)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == STUDENT_CLASS[arch]
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student(ids).logits, atol=0, rtol=0)


def test_tied_embeddings_teacher(tmp_path):
    teacher = tiny_teacher("qwen2", tie_word_embeddings=True)
    student = decompress(teacher, 4, 2, fill=False, rescale="none")
    assert student.config.tie_word_embeddings
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids()
    with torch.no_grad(), all_experts_active(reloaded):
        _assert_logits_close(reloaded(ids).logits, teacher(ids).logits)


def test_student_shapes_and_shared_weights():
    teacher = tiny_teacher("qwen2")
    student = decompress(teacher, 8, 2)
    assert isinstance(student, Qwen2MoeForCausalLM)
    blocks = moe_blocks(student)
    assert len(blocks) == 2
    assert blocks[0].experts.gate_up_proj.shape == (8, 2 * 32, 32)  # width d_ff/k = 32
    assert blocks[0].experts.down_proj.shape == (8, 32, 32)
    assert blocks[0].shared_expert.down_proj.weight.numel() == 0
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    torch.testing.assert_close(
        student.model.layers[1].self_attn.q_proj.bias, teacher.model.layers[1].self_attn.q_proj.bias
    )


def test_experts_hold_core_cluster_and_fill():
    teacher = tiny_teacher("llama")
    stats = collect_stats(teacher, token_batches(), num_experts=8)
    student = decompress(teacher, 8, 2, stats)
    gate = teacher.model.layers[0].mlp.gate_proj.weight
    expert_gate = moe_blocks(student)[0].experts.gate_up_proj[:, :32]  # [N, W, H] gate rows
    members = stats.clusters[0].members()
    for j in range(8):
        torch.testing.assert_close(expert_gate[j, :8], gate[members[j]])
        # The fill rows are teacher rows outside the core cluster, all distinct.
        match = (expert_gate[j, 8:, None, :] == gate[None]).all(-1)
        picked = match.float().argmax(1)
        assert match.any(1).all() and len(set(picked.tolist())) == 24
        assert not set(picked.tolist()) & set(members[j].tolist())
    # Router rows are the cluster mean gate rows.
    torch.testing.assert_close(moe_blocks(student)[0].gate.weight, stats.clusters[0].router_NH)


def test_random_split_and_cluster_inits_differ_only_in_clusters():
    teacher = tiny_teacher("llama")
    km = cluster_teacher(teacher, 4, method="kmeans")
    rnd = cluster_teacher(teacher, 4, method="random")
    assert km.summary()["objective"] <= rnd.summary()["objective"]
    a = decompress(teacher, 4, 2, init="cluster")
    b = decompress(teacher, 4, 2, init="random_split")
    assert not torch.equal(moe_blocks(a)[0].gate.weight, moe_blocks(b)[0].gate.weight)
    with pytest.raises(DecompressionError, match="needs 'random' clusters"):
        decompress(teacher, 4, 2, init="random_split", clusters=km)
    stats = collect_stats(teacher, token_batches(1), num_experts=4, method="random")
    c = decompress(teacher, 4, 2, stats, init="random_split")
    torch.testing.assert_close(moe_blocks(c)[0].gate.weight, stats.clusters[0].router_NH)


def test_clusters_roundtrip(tmp_path):
    clusters = cluster_teacher(tiny_teacher("qwen3"), 4)
    clusters.save(tmp_path / "c.pt")
    again = TeacherClusters.load(tmp_path / "c.pt")
    assert torch.equal(again[1].assignment_F, clusters[1].assignment_F)


def test_stats_shapes_and_padding():
    teacher = tiny_teacher("llama")
    batches = token_batches()
    stats = collect_stats(teacher, batches, num_experts=4)
    assert stats.num_tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert stats.importance_NF[0].shape == (4, 64)
    torch.testing.assert_close(stats.mean_targets_N[0].sum(), torch.tensor(1.0))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=3, top_k=1), "not divisible by num_experts"),
        (dict(num_experts=8, top_k=3), "not divisible by top_k"),
        (dict(num_experts=4, top_k=8), "top_k=8 > num_experts=4"),
        (dict(num_experts=0, top_k=1), "positive int"),
        (dict(num_experts=4, top_k=2, init="dense"), "init must be one of"),
    ],
)
def test_invalid_configurations(kwargs, match):
    teacher = tiny_teacher("llama")
    with pytest.raises(DecompressionError, match=match):
        decompress(teacher, **kwargs)


def test_unsupported_and_non_gated_teachers():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(DecompressionError, match="unsupported teacher architecture 'gpt2'"):
        decompress(gpt2, 2, 1)
    moe = AutoModelForCausalLM.from_config(
        MixtralConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=2,
        )
    )
    with pytest.raises(DecompressionError, match="already an MoE"):
        decompress(moe, 2, 1)
    with pytest.raises(DecompressionError, match="mlp_bias"):
        decompress(tiny_teacher("llama", mlp_bias=True), 2, 1)
    with pytest.raises(DecompressionError, match="silu"):
        decompress(tiny_teacher("llama", hidden_act="gelu"), 2, 1)
    with pytest.raises(DecompressionError, match="sliding_window"):
        decompress(
            AutoModelForCausalLM.from_config(tiny_dense_config("qwen2", use_sliding_window=True)), 2, 1
        )


def test_package_is_callable():
    import padd
    import padd.decompress

    student = padd.decompress(tiny_teacher("llama"), 4, 2, init="upcycle")
    assert type(student).__name__ == "MixtralForCausalLM"
    assert padd.decompress.collect_stats is collect_stats


def test_stats_and_clusters_together_rejected():
    teacher = tiny_teacher("llama")
    stats = collect_stats(teacher, token_batches(1), num_experts=4)
    with pytest.raises(DecompressionError, match="not both"):
        decompress(teacher, 4, 2, stats, clusters=cluster_teacher(teacher, 4))
