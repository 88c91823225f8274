"""Each PADD formula against values computed by hand on small tensors."""

import math

import pytest
import torch

from padd.training.objectives import (
    advantage_temperature,
    clip_fraction,
    clipped_surrogate,
    drift_penalised_ratio,
    expert_load_and_advantage,
    group_advantages,
    masked_mean,
    phi,
    reference_kl,
    router_drift,
    update_selection_bias,
)

T1 = math.tanh(1.0)  # 0.76159...


def test_group_advantages_hand_values():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.0, 0.0, 0.0]])
    a = group_advantages(r, eps=0.0)
    # Row 0: mean .5, unbiased std sqrt(1/3) → ±(.5·sqrt 3). Row 1: no variance → 0.
    # Row 2: mean .125, centred [.375, −.125 ×3], unbiased std .25 → [1.5, −.5, −.5, −.5].
    s = 0.5 * math.sqrt(3)
    expected = torch.tensor([[s, -s, -s, s], [0.0, 0, 0, 0], [1.5, -0.5, -0.5, -0.5]])
    torch.testing.assert_close(a, expected)
    assert a.dtype == torch.float32
    torch.testing.assert_close(
        group_advantages(r, eps=1e-4)[2], torch.tensor([1.5, -0.5, -0.5, -0.5]) * 0.25 / 0.2501
    )


def test_group_advantages_zero_variance_is_exactly_zero_never_nan():
    # 0.1 has no exact binary form: mean − r is round-off, which /eps would blow up.
    r = torch.full((3, 5), 0.1)
    assert torch.equal(group_advantages(r), torch.zeros(3, 5))
    assert torch.equal(group_advantages(torch.tensor([[1.0], [0.0]])), torch.zeros(2, 1))  # G = 1
    assert not torch.isnan(group_advantages(torch.zeros(2, 4))).any()


def test_group_advantages_scale_modes():
    r = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(
        group_advantages(r, scale_rewards=False), torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    )
    torch.testing.assert_close(
        group_advantages(r, scale_rewards="none"), torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    )
    # "batch": std of all four rewards [2, 0, 1, 1] (unbiased) = sqrt(2/3).
    std = math.sqrt(2 / 3)
    torch.testing.assert_close(
        group_advantages(r, eps=0.0, scale_rewards="batch"), torch.tensor([[1 / std, -1 / std], [0.0, 0.0]])
    )
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(r, scale_rewards="per-token")


def test_phi_and_teacher_temperature_both_forms():
    a = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(phi(a), torch.tensor([1 + 0.5 * T1, 1.0, 1 - 0.5 * T1]))
    torch.testing.assert_close(phi(a, form="paper"), torch.tensor([1 - T1, 1.0, 1 + T1]))
    # Corrected: good paths (A > 0) get a LOWER temperature; within [τ(1−ρ), τ(1+ρ)].
    t = advantage_temperature(a, tau=2.0, rho=0.5, kappa=1.0)
    torch.testing.assert_close(t, torch.tensor([2 * (1 + 0.5 * T1), 2.0, 2 * (1 - 0.5 * T1)]))
    assert t[2] < t[1] < t[0]
    big = advantage_temperature(torch.tensor([-50.0, 50.0]), tau=1.0)
    torch.testing.assert_close(big, torch.tensor([1.5, 0.5]))
    # κ sharpens: tanh(2·0.5) = tanh(1).
    torch.testing.assert_close(phi(torch.tensor([0.5]), rho=0.3, kappa=2.0), torch.tensor([1 - 0.3 * T1]))
    # The literal form reaches 0 at very negative A: clamped, never a division by zero.
    torch.testing.assert_close(
        advantage_temperature(torch.tensor([-100.0]), form="paper"), torch.tensor([1e-2])
    )
    with pytest.raises(ValueError, match="form"):
        phi(a, form="other")


def test_router_drift_mean_over_layers_of_l2():
    new = [torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([[0.5, 0.5], [0.5, 0.5]])]
    old = [torch.tensor([[0.0, 1.0], [0.5, 0.5]]), torch.tensor([[0.5, 0.5], [0.0, 1.0]])]
    # token 0: layer 1 ‖(1,−1)‖ = √2, layer 2: 0 → √2/2. token 1: 0 and ‖(.5,−.5)‖ = √.5 → √.5/2.
    torch.testing.assert_close(router_drift(new, old), torch.tensor([math.sqrt(2) / 2, math.sqrt(0.5) / 2]))
    with pytest.raises(ValueError):
        router_drift(new, old[:1])


def test_drift_penalty_only_on_negative_advantage_and_never_differentiated():
    logp_new = torch.log(torch.tensor([[1.1, 1.1], [1.1, 1.1]])).requires_grad_(True)
    logp_old = torch.zeros(2, 2)
    drift = torch.tensor([[0.5, 0.25], [0.5, 0.25]], requires_grad=True)
    adv = torch.tensor([-1.0, 2.0])
    ratio = drift_penalised_ratio(logp_new, logp_old, drift, adv, lam=2.0)
    expected = torch.tensor([[1.1 * math.exp(-1.0), 1.1 * math.exp(-0.5)], [1.1, 1.1]])
    torch.testing.assert_close(ratio, expected)
    ratio.sum().backward()
    assert drift.grad is None  # sg(Γ): no gradient reaches the drift
    torch.testing.assert_close(logp_new.grad, expected)  # d(ρ·c)/d logp = ρ·c, c a constant
    # RSPO-style: every sample penalised; "none": plain ratio. A = 0 is not penalised.
    all_ = drift_penalised_ratio(logp_new.detach(), logp_old, drift, adv, lam=2.0, drift_on="all")
    torch.testing.assert_close(all_[1], torch.tensor([1.1 * math.exp(-1.0), 1.1 * math.exp(-0.5)]))
    none = drift_penalised_ratio(logp_new.detach(), logp_old, drift, adv, lam=2.0, drift_on="none")
    torch.testing.assert_close(none, torch.full((2, 2), 1.1))
    zero_adv = drift_penalised_ratio(logp_new.detach(), logp_old, drift, torch.zeros(2), lam=2.0)
    torch.testing.assert_close(zero_adv, torch.full((2, 2), 1.1))
    with pytest.raises(ValueError, match="drift_on"):
        drift_penalised_ratio(logp_new, logp_old, drift, adv, drift_on="positive")


def test_clipped_surrogate_hand_values_and_gradient():
    ratio = torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    # A = +1: min(1.5, 1.2)=1.2, min(.5, .5)=.5, 1. A = −1: min(−1.5, −1.2)=−1.5, min(−.5, −.8)=−.8, −1.
    j = clipped_surrogate(ratio, adv, epsilon=0.2)
    torch.testing.assert_close(j, torch.tensor((1.2 + 0.5 + 1.0 - 1.5 - 0.8 - 1.0) / 6))
    j.backward()
    # Clipped tokens carry no gradient.
    torch.testing.assert_close(ratio.grad, torch.tensor([[0.0, 1.0, 1.0], [-1.0, 0.0, -1.0]]) / 6)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    torch.testing.assert_close(clipped_surrogate(ratio.detach(), adv, 0.2, mask), torch.tensor(-0.15))
    torch.testing.assert_close(clip_fraction(ratio.detach(), adv, 0.2), torch.tensor(2 / 6))
    torch.testing.assert_close(clip_fraction(ratio.detach(), adv, 0.2, mask), torch.tensor(2 / 4))
    # Asymmetric clip (ε_high = 0.6): 1.5 is no longer clipped for A > 0.
    high = clipped_surrogate(ratio.detach(), adv, 0.2, epsilon_high=0.6)
    torch.testing.assert_close(high, torch.tensor((1.5 + 0.5 + 1.0 - 1.5 - 0.8 - 1.0) / 6))


def test_masked_mean_and_reference_kl():
    torch.testing.assert_close(
        masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1, 1, 0])), torch.tensor(2.0)
    )
    assert masked_mean(torch.ones(3), torch.zeros(3)) == 0.0  # empty mask: 0, not NaN
    # k3 with π = .5, π_ref = .25: d = ln .5 → .5 − ln .5 − 1.
    kl = reference_kl(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25])))
    torch.testing.assert_close(kl, torch.tensor([0.5 + math.log(2) - 1]))
    assert reference_kl(torch.tensor([-0.3]), torch.tensor([-0.3])) == 0.0


def test_expert_load_and_advantage():
    sel = [torch.tensor([[0, 1], [1, 2], [0, 1]])]
    counts, sums = expert_load_and_advantage(sel, torch.tensor([1.0, -1.0, 2.0]), torch.tensor([1, 1, 0]), 4)
    torch.testing.assert_close(counts, torch.tensor([[1.0, 2.0, 1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(sums, torch.tensor([[1.0, 0.0, -1.0, 0.0]], dtype=torch.float64))


def test_stage4_reward_signal_vanishes_when_a_prompt_fixes_the_route():
    """Stage IV's reward signal comes only from rollouts of one prompt that route differently:
    when all G rollouts take the same experts on every token and have equal lengths, each
    expert's summed advantage is a sum of whole groups, and group advantages are centred, so
    A_j = 0. One rollout taking another route on one token makes it nonzero."""
    rewards = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])  # P = 2, G = 4
    adv_B = group_advantages(rewards).reshape(-1)
    R = 3  # response tokens per rollout
    token_adv = adv_B.repeat_interleave(R)
    route_P = torch.tensor([[0, 1], [2, 3]])  # prompt 0 → experts 0, 1; prompt 1 → 2, 3
    sel = route_P.repeat_interleave(4 * R, dim=0)
    _, sums = expert_load_and_advantage([sel], token_adv, None, 4)
    torch.testing.assert_close(sums, torch.zeros(1, 4, dtype=torch.float64), atol=1e-5, rtol=0)
    sel[1 * R] = torch.tensor([2, 3])  # rollout 1 (A < 0) of prompt 0, first token, elsewhere
    _, sums = expert_load_and_advantage([sel], token_adv, None, 4)
    assert sums[0, 0] > 0 and sums[0, 2] < 0


def test_update_selection_bias_corrected_sign_and_ema():
    bias = torch.zeros(1, 4)
    f = torch.tensor([[0.55, 0.15, 0.15, 0.15]])  # f̄ = .25 → excess [.3, −.1, −.1, −.1]
    a = torch.tensor([[1.0, float("nan"), -2.0, 0.0]])  # expert 1 got no token: EMA kept
    ema = torch.tensor([[0.0, 0.5, 0.0, 0.0]])
    out_bias, out_ema = update_selection_bias(bias, f, a, ema, eta=0.1, gamma=0.2, lam_ema=0.5)
    assert out_bias is bias and out_ema is ema  # in place
    torch.testing.assert_close(ema, torch.tensor([[0.5, 0.5, -1.0, 0.0]]))
    # b = −η·excess + γ·EMA = [−.03 + .1, .01 + .1, .01 − .2, .01]: the overloaded expert 0 loses
    # on load and regains on advantage.
    torch.testing.assert_close(bias, torch.tensor([[0.07, 0.11, -0.19, 0.01]]))


def test_update_selection_bias_sign_form():
    bias, ema = torch.zeros(1, 4), torch.zeros(1, 4)
    f = torch.tensor([[0.55, 0.15, 0.15, 0.15]])
    a = torch.tensor([[1.0, 1.0, -2.0, 0.0]])
    update_selection_bias(bias, f, a, ema, eta=0.1, gamma=0.2, lam_ema=0.5, sign_form=True)
    # load term −η·sign(excess) = [−.1, .1, .1, .1]; γ·EMA = .2·[.5, .5, −1, 0].
    torch.testing.assert_close(bias, torch.tensor([[0.0, 0.2, -0.1, 0.1]]))


@pytest.mark.parametrize("sign_form", [False, True])
def test_bias_updates_balance_a_skewed_router(sign_form):
    """Stage IV dynamics without a model: top-k of skewed logits + bias, a few dozen updates."""
    g = torch.Generator().manual_seed(0)
    E, k = 8, 2
    logits = torch.randn(512, E, generator=g) + torch.linspace(3.0, 0.0, E)
    bias, ema = torch.zeros(1, E), torch.zeros(1, E)

    def cv():
        sel = torch.topk(logits + bias[0], k, -1).indices
        f = torch.bincount(sel.reshape(-1), minlength=E).float() / sel.numel()
        return f, float(f.std(unbiased=False) / f.mean())

    f0, cv0 = cv()
    for _ in range(60):
        f, _ = cv()
        eta = 0.1 if sign_form else 0.5
        update_selection_bias(bias, f[None], torch.zeros(1, E), ema, eta=eta, gamma=0.0, sign_form=sign_form)
    assert cv()[1] < 0.35 * cv0, (cv0, cv()[1])


def test_informative_groups_keeps_groups_whose_rewards_differ_first():
    from padd.training.objectives import informative_groups

    r = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.5]])  # groups 1 and 3 differ
    assert informative_groups(r, 2).tolist() == [1, 3]
    assert informative_groups(r, 1).tolist() == [1]
    assert informative_groups(r, 3).tolist() == [0, 1, 3]  # then the first constant group
    assert informative_groups(r, 4).tolist() == [0, 1, 2, 3]
    for bad in (0, 5):
        with pytest.raises(ValueError, match="keep"):
            informative_groups(r, bad)
