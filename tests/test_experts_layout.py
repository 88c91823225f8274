"""`check_fused_swiglu`, the one experts-layout check of `MoE.from_hf`, the "padd" experts
implementation and decompression (they used to be three checks that disagreed)."""

import pytest
import torch
from dense_tiny_models import tiny_teacher
from moe_tiny_models import tiny_model

import padd.decompress.convert as convert
from padd import MoE
from padd.decompress import decompress
from padd.moe import hf_experts
from padd.moe.experts_layout import check_fused_swiglu


def _block():
    return tiny_model("mixtral").model.layers[0].mlp


def _paths(block):
    """Every place that runs or fills experts, each a callable on the block."""
    x_TH = torch.randn(3, block.experts.gate_up_proj.shape[-1])
    return {
        "from_hf": lambda: MoE.from_hf(block),
        "padd_experts_forward": lambda: hf_experts.padd_experts_forward(
            block.experts, x_TH, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
        ),
    }


def test_the_fused_layout_passes_and_gives_its_sizes():
    block = _block()
    assert check_fused_swiglu(block.experts) == (6, 16, 32)  # E, I, H of the tiny Mixtral
    for run in _paths(block).values():
        run()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("is_transposed", True),
        ("is_concatenated", False),
        ("has_bias", True),
        ("has_gate", False),
        ("has_post_expert_norm", True),
        # from_hf used to accept it: its gate_up_proj holds this rank's experts only.
        ("_is_expert_parallel", True),
    ],
)
def test_every_path_refuses_a_layout_padd_does_not_compute(flag, value):
    block = _block()
    setattr(block.experts, flag, value)
    for run in _paths(block).values():
        with pytest.raises(NotImplementedError, match=rf"fused SwiGLU.*{flag}={value}"):
            run()


def test_inconsistent_or_missing_weights_are_refused():
    block = _block()
    block.experts.down_proj = torch.nn.Parameter(block.experts.down_proj.transpose(1, 2).contiguous())
    with pytest.raises(NotImplementedError, match=r"not \[E, 2I, H\] and \[E, H, I\]"):
        check_fused_swiglu(block.experts)
    del block.experts.down_proj
    with pytest.raises(NotImplementedError, match="no gate_up_proj / down_proj"):
        MoE.from_hf(block)  # used to raise TypeError, while the forward raised NotImplementedError


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
