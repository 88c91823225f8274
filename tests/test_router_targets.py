"""Teacher sequence clusters as routing targets of a tied-group student, in Stage I and II–IV."""

import pytest
import torch
from test_trainer import _one_thread, char_tokenizer, tiny_teacher  # noqa: F401 (autouse fixture)

from padd.data.problem import Problem, format_example, format_prompt
from padd.decompress import (
    SequenceRouterTargets,
    decompress,
    fit_group_router,
    fit_sequence_targets,
    moe_blocks,
)
from padd.decompress.sequence_targets import _fit_softmax_regression, prompt_mean, sft_prompt_mask
from padd.moe import TiedRouterGroups
from padd.moe.router_groups import group_mean
from padd.training.config import preset
from padd.training.trainer import PADDTrainer

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


def _sft_batch(problems, tok):
    rows, labels = [], []
    for p in problems:
        prompt = tok(format_prompt(p.question))["input_ids"]
        full = tok(format_example(p))["input_ids"] + [tok.eos_token_id]
        rows.append(full)
        labels.append([-100] * len(prompt) + full[len(prompt) :])
    width = max(map(len, rows))
    pad = tok.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def _problems(n=16):
    ops = [("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)]
    out = []
    for i in range(n):
        sym, fn = ops[i % 3]
        a, b = 2 + i % 7, 1 + i % 5
        out.append(Problem(f"{a}{sym}{b}?", f"{a}{sym}{b}={fn(a, b)}\n#### {fn(a, b)}", str(fn(a, b)), sym))
    return out


def test_prompt_mean_and_sft_prompt_mask_hand_values():
    h = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert prompt_mean(h, mask).flatten().tolist() == [0.5, 4.5]
    batch = {"input_ids": torch.zeros(1, 4), "attention_mask": torch.tensor([[1, 1, 1, 0]]),
             "labels": torch.tensor([[-100, -100, 5, -100]])}  # fmt: skip
    assert sft_prompt_mask(batch).tolist() == [[True, True, False, False]]


def test_targets_hand_values_and_round_trip(tmp_path):
    t = SequenceRouterTargets(torch.eye(2), group_size=2, xi=0.5)
    p = t.group_probs(torch.tensor([[3.0, 0.0]]))  # cos = (1, 0): softmax((2, 0))
    want = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    torch.testing.assert_close(p[0], want)
    log_e = t.expert_log_targets(torch.tensor([[3.0, 0.0]]))[0]
    torch.testing.assert_close(log_e.exp(), want.repeat_interleave(2) / 2)
    t.save(tmp_path)
    back = SequenceRouterTargets.load(tmp_path)
    assert back.group_size == 2 and back.xi == 0.5 and torch.equal(back.centroids_GH, t.centroids_GH)
    assert SequenceRouterTargets.load(tmp_path / "none") is None


def test_softmax_regression_recovers_a_linear_rule():
    gen = torch.Generator().manual_seed(0)
    w_true = torch.randn(3, 8, generator=gen)
    x = torch.randn(600, 8, generator=gen)
    p = torch.softmax(4 * x @ w_true.T, -1)
    w = _fit_softmax_regression(x, p, steps=300, lr=0.05, weight_decay=0.0)
    agree = ((x @ w.T).argmax(-1) == p.argmax(-1)).float().mean()
    assert agree > 0.95


def test_stage1_router_fit_is_tied_and_keeps_the_student_exact():
    tok = char_tokenizer()
    teacher = tiny_teacher()
    batches = [_sft_batch(_problems(16), tok)]
    targets = fit_sequence_targets(teacher, batches, num_groups=2, group_size=2, xi=0.1)
    assert targets.centroids_GH.shape == (2, teacher.config.hidden_size)
    student = decompress(teacher, 4, 2, init="exact")
    agreement = fit_group_router(student, teacher, batches, targets)
    assert len(agreement) == 2 and all(a > 0.5 for a in agreement)  # chance is 0.5 at best
    for block in moe_blocks(student):
        assert torch.equal(block.gate.weight, group_mean(block.gate.weight, 2))
    ids = batches[0]["input_ids"][:, :10]
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("router_weight", [0.0, 1.0])
def test_stage2_router_objective_moves_only_tied_rows(router_weight):
    """The router learns only from L_route: with weight 0 it stays exactly put, with weight 1 it
    moves and stays tied; the route loss is reported and falls."""
    tok = char_tokenizer()
    teacher = tiny_teacher()
    batches = [_sft_batch(_problems(16), tok)]
    targets = fit_sequence_targets(teacher, batches, num_groups=2, group_size=2, xi=0.05)
    student = decompress(teacher, 4, 2, init="exact")
    before = [b.gate.weight.detach().clone() for b in moe_blocks(student)]
    # every rollout and every prompt: the steps do not depend on the teacher's answers
    cfg = preset("padd", num_generations=4, max_new_tokens=8, learning_rate=1e-2, router_weight=router_weight,
                 kd_on="all", dynamic_sampling=1)  # fmt: skip
    kl_before = _route_kl(student, teacher, batches[0], targets)
    with TiedRouterGroups(student) as tied:
        # only the routers learn here, so the measurement below sees the router objective alone
        routers = [b.gate.weight for b in moe_blocks(student)]
        opt = torch.optim.AdamW(routers, lr=1e-2)
        trainer = PADDTrainer(student, teacher, tok, cfg, router_targets=targets, optimizer=opt)
        history = [trainer.step(_problems(16)[:4]) for _ in range(4)]
        assert tied.max_untied() == 0.0
    moved = any(not torch.equal(b.gate.weight, w0) for b, w0 in zip(moe_blocks(student), before, strict=True))
    assert moved == (router_weight > 0)
    if router_weight > 0:
        assert all(m["route_loss"] > 0 for m in history)
        # measured on fixed sequences (the rollouts differ from step to step)
        assert _route_kl(student, teacher, batches[0], targets) < kl_before
    else:
        assert "route_loss" not in history[0]


@torch.no_grad()
def _route_kl(student, teacher, batch, targets):
    """Mean over layers and real tokens of KL(p_S ‖ p_T), computed here by hand."""
    from padd.decompress.sequence_targets import teacher_prompt_features
    from padd.moe import RoutingControl

    log_t = targets.expert_log_targets(teacher_prompt_features(teacher, batch))
    log_t = log_t.repeat_interleave(batch["input_ids"].shape[1], 0)
    keep = batch["attention_mask"].reshape(-1).bool()
    with RoutingControl(student, capture=True) as control:
        student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        total = 0.0
        for z in control.router_logits:
            log_s = torch.log_softmax(z.float(), -1)
            total += float((log_s.exp() * (log_s - log_t)).sum(-1)[keep].mean())
    return total / len(control.router_logits)


def test_router_objective_trains_the_router_only():
    """Under a tied-group student's routing, a loss on the router logits has no gradient path
    into the backbone: only the router weights receive gradient."""
    from padd.moe import RoutingControl

    teacher = tiny_teacher()
    student = decompress(teacher, 4, 2, init="exact")
    ids = torch.randint(3, 40, (2, 9))
    with RoutingControl(student, capture=True) as control:
        student(ids)
        sum(z.square().sum() for z in control.router_logits).backward()
    for name, p in student.named_parameters():
        has_grad = p.grad is not None and bool(p.grad.any())
        assert has_grad == name.endswith("gate.weight"), name
