"""padd.flops: analytic FLOPs per token == FlopCounterMode, on real and meta models."""

import pytest
import torch
from dense_tiny_models import ARCHS, tiny_teacher
from transformers import AutoModelForCausalLM, LlamaConfig, OlmoeConfig, Qwen2Config, Qwen2MoeConfig

from padd import flops
from padd.decompress import decompress
from padd.decompress.architectures import student_config


@pytest.mark.parametrize("arch", ARCHS)
def test_analytic_equals_measured_teacher_and_student(arch):
    teacher = tiny_teacher(arch)
    student = decompress(teacher, 4, 2)
    for model in (teacher, student):
        measured = flops.measure(model, seq_len=8)
        assert measured.as_dict() == flops.analytic(model.config, seq_len=8).as_dict()
        assert measured.other == 0
    # Implementations are restored after counting.
    assert student.config._attn_implementation == teacher.config._attn_implementation
    assert student.config._experts_implementation == "grouped_mm"


def test_measured_through_padd_experts():
    """With experts_implementation="padd" the count goes through padd's custom ops."""
    import padd  # noqa: F401  (registers "padd" in transformers)

    student = decompress(tiny_teacher("llama"), 4, 2)
    student.set_experts_implementation("padd")
    assert flops.measure(student, seq_len=8) == flops.analytic(student.config, seq_len=8)
    assert student.config._experts_implementation == "padd"
    meta = flops.meta_model(student.config)
    meta.set_experts_implementation("padd")
    assert flops.measure(meta, seq_len=8) == flops.analytic(student.config, seq_len=8)


def test_tiny_default_parity():
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(cfg).eval()
    student = decompress(teacher, 8, 2)
    report = flops.compare(teacher, student, seq_len=16)
    t, s = report["teacher"]["measured"], report["student"]["measured"]
    assert s["ffn"] == t["ffn"] and s["attention"] == t["attention"] and s["lm_head"] == t["lm_head"]
    assert s["router"] == 4 * 2 * 128 * 8
    assert 1.0 < report["ratio"] <= 1.01
    assert report["student"]["active_params"] == report["teacher"]["params"] + 4 * 8 * 128
    assert report["student"]["params"] > 3 * report["teacher"]["params"]


def test_meta_device_7b_config():
    teacher_cfg = Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
    )
    teacher = flops.meta_model(teacher_cfg)
    student = flops.meta_model(student_config(teacher_cfg, 64, 8, 18944 // 8))
    assert next(student.parameters()).device.type == "meta"
    report = flops.compare(teacher, student, seq_len=64)
    for name in ("teacher", "student"):
        assert report[name]["measured"] == report[name]["analytic"]
    assert 7.5e9 < report["teacher"]["params"] < 7.7e9
    assert report["ratio"] <= 1.01


def test_moe_configs_with_shared_expert_and_dense_layers():
    qwen2moe = Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=6,
        num_experts_per_tok=2,
        num_hidden_layers=3,
        mlp_only_layers=[1],
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    olmoe = OlmoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        num_experts=6,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=2,
        pad_token_id=0,
    )
    for cfg in (qwen2moe, olmoe):
        model = flops.meta_model(cfg)
        assert flops.measure(model, seq_len=8) == flops.analytic(cfg, seq_len=8)
    # Qwen2-MoE: 2 MoE layers (shared expert + gate), 1 dense layer.
    a = flops.analytic(qwen2moe, seq_len=8)
    assert a.ffn == 2 * (6 * 32 * 16 * 2 + 6 * 32 * 24) + 6 * 32 * 48
    assert a.router == 2 * (2 * 32 * 6 + 2 * 32)


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_flops_summary_reads_no_student_weights(arch, tmp_path, monkeypatch):
    """`eval/flops.json` counts a saved student from its config on `meta`: the same FLOPs and
    parameter counts as the loaded model, without reading its weights."""
    import transformers

    from padd.pipeline.evaluate import flops_summary

    teacher = tiny_teacher(arch)
    student = decompress(teacher, 4, 2)
    student.save_pretrained(tmp_path)
    want = flops.compare(teacher, student, seq_len=16, measured=False)

    def no_weights(*args, **kwargs):
        raise AssertionError("flops_summary loaded the student's weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    assert flops_summary(teacher, tmp_path, 16) == want
