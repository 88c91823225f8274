"""The experts-layout checks: `plan_experts` (the "padd" experts implementation and
`MoE.from_hf`) and `check_fused_swiglu` (decompression's students), on a tiny Mixtral whose flags
are changed under it."""

import pytest
import torch
from dense_tiny_models import tiny_teacher
from moe_tiny_models import tiny_model

import padd.decompress.convert as convert
from padd import MoE
from padd.decompress import decompress
from padd.moe import hf_experts
from padd.moe.experts_layout import check_fused_swiglu
from padd.moe.experts_plan import plan_experts


def _block():
    return tiny_model("mixtral").model.layers[0].mlp


def _forward(block):
    x_TH = torch.randn(3, block.experts.gate_up_proj.shape[-1])
    return hf_experts.padd_experts_forward(
        block.experts, x_TH, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
    )


def test_the_fused_layout_passes_and_gives_its_sizes():
    block = _block()
    assert check_fused_swiglu(block.experts) == (6, 16, 32)  # E, I, H of the tiny Mixtral
    plan = plan_experts(block.experts)
    assert plan.fused and plan.activation.name == "swiglu"
    assert (plan.layout.num_experts, plan.layout.inter, plan.layout.hidden) == (6, 16, 32)
    MoE.from_hf(block)
    _forward(block)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        # The weights stay [E, 2I, H]: declared transposed, their shapes no longer agree.
        ("is_transposed", True, r"are not \[E, H, 2I\] and \[E, I, H\] \(is_transposed=True\)"),
        ("has_bias", True, "has_bias=True but gate_up_proj_bias is not"),
        ("has_gate", False, "no up_proj / down_proj tensors"),
        ("has_post_expert_norm", True, "has_post_expert_norm=True but no post_expert_norm"),
    ],
)
def test_flags_the_weights_do_not_match_are_refused_everywhere(flag, value, message):
    block = _block()
    setattr(block.experts, flag, value)
    for run in (lambda: MoE.from_hf(block), lambda: _forward(block), lambda: plan_experts(block.experts)):
        with pytest.raises(NotImplementedError, match=message):
            run()


def test_the_activation_comes_from_apply_gate_not_from_the_concatenation_flag():
    """transformers' own backends ignore `is_concatenated` and call `_apply_gate`; so does padd."""
    block = _block()
    block.experts.is_concatenated = False
    plan = plan_experts(block.experts)
    assert plan.fused and not plan.activation.interleaved


def test_from_hf_refuses_expert_parallel_experts_which_the_forward_runs():
    block = _block()
    block.experts._is_expert_parallel = True
    with pytest.raises(NotImplementedError, match="sharded across ranks"):
        MoE.from_hf(block)
    assert torch.isfinite(_forward(block)).all()


def test_inconsistent_or_missing_weights_are_refused():
    block = _block()
    block.experts.down_proj = torch.nn.Parameter(block.experts.down_proj.transpose(1, 2).contiguous())
    with pytest.raises(NotImplementedError, match=r"not \[E, 2I, H\] and \[E, H, I\]"):
        check_fused_swiglu(block.experts)
    with pytest.raises(NotImplementedError, match=r"are not \[E, 2I, H\] and \[E, H, I\]"):
        plan_experts(block.experts)
    del block.experts.down_proj
    with pytest.raises(NotImplementedError, match="no gate_up_proj / down_proj"):
        MoE.from_hf(block)


def test_quantised_experts_are_refused():
    block = _block()
    block.experts.gate_up_proj = torch.nn.Parameter(
        block.experts.gate_up_proj.to(torch.int8), requires_grad=False
    )
    with pytest.raises(NotImplementedError, match="torch.int8 \\(quantised experts"):
        plan_experts(block.experts)


def test_decompression_checks_the_students_layout_before_filling_it(monkeypatch):
    """A student whose experts module declares a transposed layout is refused, not filled with
    [N, 2W, H] weights (a shape check alone passes when H = 2W)."""
    build = convert.AutoModelForCausalLM.from_config

    def transposed_student(*args, **kwargs):
        student = build(*args, **kwargs)
        for block in convert.moe_blocks(student):
            block.experts.is_transposed = True
        return student

    monkeypatch.setattr(convert.AutoModelForCausalLM, "from_config", transposed_student)
    with pytest.raises(NotImplementedError, match="is_transposed=True"):
        decompress(tiny_teacher("llama"), 4, 2)
