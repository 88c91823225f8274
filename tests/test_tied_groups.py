"""The exact (tied-group) decompression: the student equals its teacher for any router.

Oracle: the teacher itself (its logits), through plain transformers forwards of the student,
saved and reloaded with `AutoModelForCausalLM`.
"""

import pytest
import torch
from dense_tiny_models import ARCHS, VOCAB, tiny_teacher
from transformers import AutoModelForCausalLM

from padd.decompress import DecompressionError, decompress, moe_blocks
from padd.moe import RoutingControl, TiedRouterGroups
from padd.moe.router_groups import GROUP_SIZE_KEY, group_mean

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


def _ids(seed=1, batch=3, seq=11):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _randomise_tied_routers(student, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    k = getattr(student.config, GROUP_SIZE_KEY)
    with torch.no_grad():
        for block in moe_blocks(student):
            e, h = block.gate.weight.shape
            rows = torch.randn(e // k, h, generator=gen) * scale
            block.gate.weight.copy_(rows.repeat_interleave(k, dim=0))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (4, 4), (8, 4), (16, 8), (64, 8)])
def test_exact_student_equals_teacher_for_any_router(arch, num_experts, top_k, tmp_path):
    teacher = tiny_teacher(arch, intermediate_size=128)
    student = decompress(teacher, num_experts, top_k, init="exact", seed=3)
    assert getattr(student.config, GROUP_SIZE_KEY) == top_k
    ids = _ids()
    with torch.no_grad():
        want = teacher(ids).logits
        for seed in range(3):  # any router: the centroid init, then random tied rows
            torch.testing.assert_close(student(ids).logits, want, atol=2e-5, rtol=1e-4)
            _randomise_tied_routers(student, seed)
    # A standard checkpoint: plain transformers reloads it, group size included.
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(loaded.config, GROUP_SIZE_KEY) == top_k
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, atol=2e-5, rtol=1e-4)


def test_exact_student_equals_teacher_under_padd_routing_with_tied_bias():
    """Through padd's router hooks too, with a selection bias tied within groups."""
    teacher = tiny_teacher("llama", intermediate_size=128)
    student = decompress(teacher, 8, 2, init="exact")
    ids = _ids(2)
    with RoutingControl(student) as control:
        control.selection_bias = torch.randn(control.num_layers, 4).repeat_interleave(2, dim=1)
        with torch.no_grad():
            torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=2e-5, rtol=1e-4)


def test_exact_experts_partition_neurons_per_group():
    """Each group of k experts holds every teacher neuron exactly once, down scaled by k."""
    teacher = tiny_teacher("llama", intermediate_size=128)
    student = decompress(teacher, 8, 2, init="exact")
    mlp = teacher.model.layers[0].mlp
    block = moe_blocks(student)[0]
    gate_up = block.experts.gate_up_proj  # [N, 2W, H]
    w = gate_up.shape[1] // 2
    for g in range(4):
        rows = torch.cat([gate_up[2 * g, :w], gate_up[2 * g + 1, :w]])
        # the group's gate rows are a permutation of the teacher's
        assert torch.equal(torch.sort(rows.sum(1)).values, torch.sort(mlp.gate_proj.weight.sum(1)).values)
    assert not torch.equal(gate_up[0], gate_up[2])  # groups partition differently
    down = block.experts.down_proj  # [N, H, W]
    torch.testing.assert_close(down.abs().sum() / 4, 2 * mlp.down_proj.weight.abs().sum())


def test_exact_needs_k_dividing_n():
    teacher = tiny_teacher("llama", intermediate_size=96)
    with pytest.raises(DecompressionError, match="top_k to divide num_experts"):
        decompress(teacher, 6, 4, init="exact")


def test_tied_groups_survive_training_and_cancel_the_task_gradient():
    """Under padd's routing the weights of a tied group are constants: AdamW steps on the task
    loss leave the router rows exactly as they were."""
    teacher = tiny_teacher("llama", intermediate_size=128)
    student = decompress(teacher, 8, 2, init="exact").train()
    _randomise_tied_routers(student, 0)
    before = [b.gate.weight.detach().clone() for b in moe_blocks(student)]
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    ids = _ids(4)
    with TiedRouterGroups(student) as tied, RoutingControl(student):
        for _ in range(3):
            loss = student(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert tied.max_untied() == 0.0
    for b, w0 in zip(moe_blocks(student), before, strict=True):
        assert b.gate.weight.grad is None  # no path from the loss to the router
        assert torch.equal(b.gate.weight, w0)  # so AdamW skips it, weight decay included


def test_without_hooks_training_unties_rows():
    """The oracle for the hooks: transformers' own routing (softmax weights) trained without them
    unties the rows (the defect the constant weights and the hooks prevent)."""
    teacher = tiny_teacher("llama", intermediate_size=128)
    student = decompress(teacher, 8, 2, init="exact").train()
    _randomise_tied_routers(student, 0, scale=0.3)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    ids = _ids(4)
    loss = student(ids, labels=ids).loss
    loss.backward()
    opt.step()
    w = moe_blocks(student)[0].gate.weight
    assert float((w - group_mean(w, 2)).abs().max()) > 1e-4
