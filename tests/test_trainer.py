"""PADDTrainer, rollouts and evaluation on tiny random models (a Llama teacher, a Mixtral student)."""

import copy
import math

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)

from padd.data.problem import Problem, format_prompt
from padd.moe.routing_control import RoutingControl
from padd.training.config import PRESETS, PADDConfig, preset
from padd.training.evaluation import evaluate, evaluate_batches, normalized_mutual_information, summarise
from padd.training.metrics import expert_counts, load_cv
from padd.training.rollout import (
    forward_with_routing,
    generate,
    response_mask,
    response_slice,
    token_logprobs,
)
from padd.training.trainer import PADDTrainer

CHARS = "0123456789 +-*=#.?:QA\n$abcdefghijklmnopqrstuvwxyz"
PROBLEMS = [
    Problem("3+4?", "3+4=7\n#### 7", "7", "add"),
    Problem("9-5?", "9-5=4\n#### 4", "4", "sub"),
    Problem("2*3?", "2*3=6\n#### 6", "6", "mul"),
]


@pytest.fixture(autouse=True)
def _one_thread():
    # The CPU is shared: one intra-op thread avoids oversubscription (and is deterministic).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


COMMON = dict(
    vocab_size=len(CHARS) + 3,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=None,
    tie_word_embeddings=False,
)


def tiny_teacher(seed: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    teacher = LlamaForCausalLM(LlamaConfig(**COMMON, intermediate_size=64))
    with torch.no_grad():  # a peaked teacher, so that the KD loss has room to fall
        teacher.lm_head.weight.mul_(40.0)
    return teacher.eval()


def tiny_student(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(
        MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    ).eval()


def small_config(name: str = "padd", **overrides) -> PADDConfig:
    # The loop's unit tests drive the printed Stage II on every prompt they pass (the tuned
    # defaults gate L_KD on the teacher's greedy answers and update on 1 prompt in 4).
    base = dict(num_generations=4, max_new_tokens=8, learning_rate=1e-2, kd_on="all", dynamic_sampling=1)
    return preset(name, **{**base, **overrides})


def _finite_metrics(m: dict) -> None:
    for key, value in m.items():
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)


def _without_times(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith("time_")}


# -- rollouts ------------------------------------------------------------------------------


def test_response_mask_keeps_tokens_up_to_the_first_eos():
    responses = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    expected = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert torch.equal(response_mask(responses, [1]), expected)


def test_left_padded_forward_reproduces_greedy_generation():
    """Position ids skip left padding, so the update's forward sees what decoding saw."""
    student, tok = tiny_student(), char_tokenizer()
    prompts = [format_prompt("3+4?"), format_prompt("12*34+5?")]  # different lengths
    batch = generate(student, tok, prompts, num_generations=2, do_sample=False, max_new_tokens=6)
    assert batch.sequences_BS.shape[0] == 4 and batch.attention_mask_BS[0, 0] == 0  # left padded
    hidden, router_logits, selected = forward_with_routing(
        student, batch.sequences_BS, batch.attention_mask_BS
    )
    logits = student.get_output_embeddings()(response_slice(hidden, batch.prompt_length))
    keep = batch.response_mask_BR.bool()
    assert torch.equal(logits.argmax(-1)[keep], batch.sequences_BS[:, batch.prompt_length :][keep])
    assert len(router_logits) == 2 and selected[0].shape == (batch.sequences_BS.numel(), 2)
    logp = token_logprobs(logits / 0.7, batch.sequences_BS[:, batch.prompt_length :])
    # Log-probs of the sampling distribution softmax(z / T): greedy tokens are its argmax too.
    expected = torch.log_softmax(logits / 0.7, -1).max(-1).values
    torch.testing.assert_close(logp[keep], expected[keep])


def test_first_update_runs_at_theta_old():
    """With one update per batch the ratio is exactly 1: no clipping, no drift."""
    trainer = PADDTrainer(tiny_student(), tiny_teacher(), char_tokenizer(), small_config(num_iterations=1))
    m = trainer.step(PROBLEMS)
    assert m["clip_fraction"] == 0.0 and m["router_drift"] == 0.0


# -- evaluation ----------------------------------------------------------------------------


def test_normalized_mutual_information_hand_values():
    assert normalized_mutual_information([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)  # relabelled
    assert normalized_mutual_information([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)  # independent
    # H(a) = ln 2, H(b) = −(.75 ln .75 + .25 ln .25), I = .5 ln(4/3) + .25 ln(2/3) + .25 ln 2.
    h_b = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    expected = mi / ((math.log(2) + h_b) / 2)
    assert normalized_mutual_information([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(expected)
    with pytest.raises(ValueError):
        normalized_mutual_information([0], [0, 1])


def test_evaluate_reports_accuracy_per_kind_and_routing():
    student, tok = tiny_student(), char_tokenizer()
    control = RoutingControl(student)
    out = evaluate(student, tok, PROBLEMS, max_new_tokens=6, batch_size=2, control=control)
    assert out["n"] == 3 and 0.0 <= out["accuracy"] <= 1.0
    assert {"accuracy/add", "accuracy/sub", "accuracy/mul"} <= set(out)
    assert 0.0 <= out["nmi"] <= 1.0 and len(out["nmi_per_layer"]) == 2
    assert out["load_cv"] >= 0 and out["routing_entropy"] > 0
    assert len(out["tokens_per_expert"]) == 2 and len(out["tokens_per_expert"][0]) == 4


def test_batches_evaluated_apart_summarise_as_one_evaluation():
    # The oracle: `evaluate` over all batches at once. Batch 1, then batch 0, as two ranks would.
    student, tok = tiny_student(), char_tokenizer()
    control = RoutingControl(student)
    kw = dict(max_new_tokens=6, batch_size=2, control=control)
    whole = evaluate(student, tok, PROBLEMS, **kw)
    parts = evaluate_batches(student, tok, PROBLEMS, indices=[1], **kw)
    parts += evaluate_batches(student, tok, PROBLEMS, indices=[0], **kw)
    assert summarise(PROBLEMS, parts) == whole
    with pytest.raises(ValueError, match="not each batch once"):
        summarise(PROBLEMS, parts[:1])
    with pytest.raises(ValueError, match="3 verdicts for 2 problems"):
        summarise(PROBLEMS[:2], parts)


def test_batch_of_cuts_consecutive_batches_with_a_short_last_one():
    from padd.training.evaluation import batch_of, num_batches

    items = list(range(7))  # hand-cut: [0, 1, 2], [3, 4, 5], [6]
    assert num_batches(len(items), 3) == 3
    assert [batch_of(items, i, 3) for i in range(3)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_evaluate_scores_a_model_that_answers():
    """A fake 'model' path is not needed: exact match on known completions via the reward."""
    from padd.training.rewards import is_correct

    assert is_correct("3+4=7\n#### 7", PROBLEMS[0].final_answer)


# -- trainer -------------------------------------------------------------------------------


def test_padd_steps_keep_losses_finite_and_lower_the_kd_loss():
    trainer = PADDTrainer(tiny_student(), tiny_teacher(), char_tokenizer(), small_config(alpha_kd=1.0))
    history = [trainer.step(PROBLEMS) for _ in range(6)]
    for m in history:
        _finite_metrics(m)
        assert 0.5 - 1e-6 <= m["t_eff_min"] <= m["t_eff_mean"] <= m["t_eff_max"] <= 1.5 + 1e-6
        assert {"reward", "accuracy", "kd_loss", "router_drift", "load_cv", "routing_entropy",
                "tokens_per_expert", "clip_fraction", "time_generation", "time_teacher",
                "time_update", "bias_abs_mean", "expert_adv_ema_abs"} <= set(m)  # fmt: skip
    assert history[-1]["expert_adv_ema_abs"] == pytest.approx(float(trainer.ema_state.abs().mean()))
    kd = [m["kd_loss"] for m in history]
    assert kd[-1] < 0.7 * kd[0], kd
    assert history[-1]["router_drift"] > 0  # the second update sees a moved router


def digit_count(text, problem):
    """A reward that varies within a group, so some advantages are negative."""
    return float(sum(ch.isdigit() for ch in text))


def _step_with_kd_inputs(trainer, problems, student_at_start, teacher):
    """One trainer step, what its update saw (batch, advantages, teacher hidden states, T_eff),
    and the inputs of a reference KD loss on that batch: the student's logits at θ_old (from
    `student_at_start`) and the teacher's, over the response positions."""
    seen = {}
    update = trainer._update

    def capture(batch, adv_B, teacher_hidden_BRH, t_eff_B, *rest):
        seen.update(batch=batch, adv=adv_B, hidden=teacher_hidden_BRH, t_eff=t_eff_B)
        return update(batch, adv_B, teacher_hidden_BRH, t_eff_B, *rest)

    trainer._update = capture
    metrics = trainer.step(problems)
    batch = seen["batch"]
    with torch.no_grad():
        hidden, _, _ = forward_with_routing(student_at_start, batch.sequences_BS, batch.attention_mask_BS)
        s_logits = student_at_start.get_output_embeddings()(response_slice(hidden, batch.prompt_length))
        t_logits = teacher.get_output_embeddings()(seen["hidden"])
    return metrics, seen, s_logits, t_logits


def test_kd_on_teacher_correct_distils_only_prompts_the_teacher_solves():
    """`kd_on="teacher_correct"`: L_KD covers the rollouts of the prompts whose greedy teacher
    answer is right (re-derived here from the teacher's own greedy output), and no other."""
    kd_on = "teacher_correct"
    from padd.kernels import kd_loss_reference

    from padd.training.rewards import extract_answer, is_correct

    teacher, tok = tiny_teacher(), char_tokenizer()
    greedy = generate(teacher, tok, [format_prompt(p.question) for p in PROBLEMS], num_generations=1,
                      do_sample=False, max_new_tokens=8)  # fmt: skip
    first = extract_answer(greedy.completions[0])
    assert first is not None  # the seeded tiny teacher writes a number for the first prompt
    # The first problem's answer is what the teacher says: it "solves" that one and no other.
    problems = [Problem(PROBLEMS[0].question, "", first, "add"), *PROBLEMS[1:]]
    solved = [is_correct(c, p.final_answer) for c, p in zip(greedy.completions, problems, strict=True)]
    assert solved == [True, False, False]

    student = tiny_student()
    student_at_start = copy.deepcopy(student)
    # digit_count grades every rollout differently, so the solved prompt's group has A < 0 rows.
    trainer = PADDTrainer(student, teacher, tok, small_config(seed=5, kd_on=kd_on), reward_fn=digit_count)
    m, seen, s_logits, t_logits = _step_with_kd_inputs(trainer, problems, student_at_start, teacher)
    batch, G = seen["batch"], trainer.config.num_generations
    keep = batch.response_mask_BR.bool().clone()
    keep[G:] = False  # rows are prompt-major: the first G rows are the solved prompt's
    rows = torch.zeros(len(keep), dtype=torch.bool)
    rows[:G] = True
    temp = seen["t_eff"][:, None].expand_as(keep)
    expected = float(kd_loss_reference(s_logits[keep], t_logits[keep], temperature=temp[keep]))
    assert m["kd_rows"] == pytest.approx(float(rows.float().mean()))
    assert m["kd_loss"] == pytest.approx(expected, rel=1e-4)


def test_kd_on_is_checked():
    with pytest.raises(ValueError, match="kd_on"):
        PADDConfig(kd_on="positive")


def test_same_seed_same_metrics():
    runs = []
    for _ in range(2):
        trainer = PADDTrainer(tiny_student(), tiny_teacher(), char_tokenizer(), small_config(seed=3))
        runs.append([_without_times(trainer.step(PROBLEMS)) for _ in range(2)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_one_step_of_each_baseline(name):
    trainer = PADDTrainer(
        tiny_student(), tiny_teacher(), char_tokenizer(), small_config(name, num_iterations=2)
    )
    before = trainer.control.selection_bias.clone()
    m = trainer.step(PROBLEMS[:2])
    _finite_metrics(m)
    cfg = trainer.config
    assert ("kd_loss" in m) == cfg.use_kd
    assert torch.equal(trainer.control.selection_bias, before) == (not cfg.use_bias)


def test_reference_kl_term_runs_when_beta_positive():
    trainer = PADDTrainer(tiny_student(), tiny_teacher(), char_tokenizer(), small_config(beta=0.1))
    m = trainer.step(PROBLEMS[:2])
    assert m["ref_kl"] >= 0 and math.isfinite(m["loss"])


def test_a_reference_without_beta_is_refused():
    student = tiny_student()
    with pytest.raises(ValueError, match="only used with PADDConfig.beta > 0"):
        PADDTrainer(student, tiny_teacher(), char_tokenizer(), small_config(), reference=tiny_student())


def _skewed_student() -> MixtralForCausalLM:
    """Routers that favour experts 0 and 1 for every token: a shared embedding component that
    the router reads with a large weight, on top of token-dependent logits of std ~1."""
    student = tiny_student()
    with torch.no_grad():
        student.model.embed_tokens.weight[:, 0] = 0.05
        for layer in student.model.layers:
            layer.mlp.gate.weight.mul_(10.0)
            layer.mlp.gate.weight[:, 0] = torch.tensor([1.2, 1.0, 0.0, 0.0])
    return student


def _load_cv(student, control, tok) -> float:
    enc = tok([format_prompt(p.question) + p.solution for p in PROBLEMS], return_tensors="pt", padding=True)
    with torch.no_grad():
        _, _, selected = forward_with_routing(student, enc["input_ids"], enc["attention_mask"], control)
    return load_cv(expert_counts(selected, control.num_experts, enc["attention_mask"].reshape(-1)))


def test_stage4_lowers_the_load_cv_of_an_imbalanced_router():
    eta, factor = 0.5, 0.65
    student, tok = _skewed_student(), char_tokenizer()
    # Only the bias moves: no KD, a negligible learning rate, no advantage term.
    cfg = small_config("no_stage2", learning_rate=1e-6, bias_eta=eta, bias_gamma=0.0)
    trainer = PADDTrainer(student, None, tok, cfg)
    cv_before = _load_cv(student, trainer.control, tok)
    assert cv_before > 0.8
    for _ in range(4):
        trainer.step(PROBLEMS)
    cv_after = _load_cv(student, trainer.control, tok)
    assert cv_after < factor * cv_before, (cv_before, cv_after, trainer.control.selection_bias)
    bias = trainer.control.selection_bias
    assert (bias[:, :2] < 0).all() and (bias[:, 2:] > 0).all()  # overloaded experts lose bias


def test_state_dict_round_trip_resumes_bit_identically(tmp_path):
    tok = char_tokenizer()
    a = PADDTrainer(tiny_student(), tiny_teacher(), tok, small_config(seed=5))
    a.step(PROBLEMS[:2])
    snapshot = copy.deepcopy(a.state_dict())
    a.save_checkpoint(tmp_path / "ckpt")
    expected = _without_times(a.step(PROBLEMS[:2]))

    for resume in ("state_dict", "checkpoint"):
        b = PADDTrainer(tiny_student(seed=9), tiny_teacher(), tok, small_config(seed=5))
        if resume == "state_dict":
            b.load_state_dict(snapshot)
        else:
            b.load_checkpoint(tmp_path / "ckpt")
        assert b.step_count == 1
        assert _without_times(b.step(PROBLEMS[:2])) == expected
        for (name, pa), pb in zip(a.student.named_parameters(), b.student.parameters(), strict=True):
            assert torch.equal(pa, pb), name
        assert torch.equal(a.control.selection_bias, b.control.selection_bias)
        assert torch.equal(a.ema_state, b.ema_state)


def test_config_validation_names_the_bad_key():
    with pytest.raises(ValueError, match="epsilon"):
        PADDConfig(epsilon=1.5)
    with pytest.raises(ValueError, match="drift_on"):
        PADDConfig(drift_on="positive")
    with pytest.raises(ValueError, match="num_generations"):
        PADDConfig(num_generations=0)
    with pytest.raises(ValueError, match="unknown PADDConfig key"):
        PADDConfig.from_dict({"num_generation": 4})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("ppo")
    assert preset("vanilla_grpo").drift_on == "none" and preset("no_stage3").drift_on == "none"
    assert preset("rspo").drift_on == "all" and preset("padd").drift_on == "negative"
    assert preset("online_kd").kd_temperature_mode == "fixed"


def test_drift_on_none_switches_stage3_off():
    """`drift_on="none"` gives exactly the update of λ = 0 (no drift penalty), "negative" does not."""

    def digit_count(text, problem):  # varies within a group, so some advantages are negative
        return float(sum(ch.isdigit() for ch in text))

    runs = {}
    for name, overrides in {"none": dict(drift_on="none"), "lam0": dict(drift_lambda=0.0), "on": {}}.items():
        cfg = small_config("no_stage2", seed=7, **overrides)
        trainer = PADDTrainer(tiny_student(), None, char_tokenizer(), cfg, reward_fn=digit_count)
        runs[name] = _without_times(trainer.step(PROBLEMS))
    assert runs["none"] == runs["lam0"]
    assert runs["on"]["router_drift"] > 0 and runs["on"]["loss"] != runs["none"]["loss"]


def test_teacher_grpo_trains_a_dense_model():
    """The `teacher_grpo` method (`--compare`'s "Teacher (GRPO)" row) is the same loop on the dense
    teacher: no router, no teacher to distil from, only the GRPO surrogate."""
    teacher = tiny_teacher()
    before = [p.detach().clone() for p in teacher.parameters()]

    def digit_count(text, problem):  # varies within a group, so advantages are nonzero
        return float(sum(ch.isdigit() for ch in text))

    cfg = small_config("teacher_grpo", max_new_tokens=6)
    trainer = PADDTrainer(teacher, None, char_tokenizer(), cfg, reward_fn=digit_count)
    assert not trainer.moe
    history = [trainer.step(PROBLEMS[:2]) for _ in range(2)]
    assert all(math.isfinite(m["loss"]) for m in history)
    assert "kd_loss" not in history[0] and "load_cv" not in history[0]
    changed = sum(not torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    assert changed > len(before) // 2


def test_fused_linear_kd_path_matches_the_logits_path():
    """kd_fused=True (padd.kernels.fused_linear_kd_loss, reference backend on CPU) gives the same
    step as KD on materialised logits."""
    runs = {}
    for fused in (False, True):
        trainer = PADDTrainer(
            tiny_student(), tiny_teacher(), char_tokenizer(), small_config(seed=2, kd_fused=fused)
        )
        runs[fused] = trainer.step(PROBLEMS[:2])
    assert runs[True]["kd_loss"] == pytest.approx(runs[False]["kd_loss"], rel=1e-4)
    assert runs[True]["loss"] == pytest.approx(runs[False]["loss"], rel=1e-3, abs=1e-5)


def test_trainer_refuses_a_control_left_in_uniform_routing():
    student = tiny_student()
    control = RoutingControl(student, mode="uniform")
    with pytest.raises(ValueError, match="learned"):
        PADDTrainer(student, tiny_teacher(), char_tokenizer(), small_config(), control)


def test_stage4_all_reduces_under_torch_distributed(tmp_path):
    """With a process group (gloo, one rank here) the bias update goes through all_reduce and
    gives the same bias as without one."""
    import torch.distributed as dist

    from padd.pipeline.distributed import shutdown

    biases = []
    for distributed in (False, True):
        if distributed:
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
        try:
            trainer = PADDTrainer(tiny_student(), tiny_teacher(), char_tokenizer(), small_config(seed=4))
            trainer.step(PROBLEMS[:2])
            biases.append(trainer.control.selection_bias.clone())
        finally:
            if distributed:
                shutdown()
    assert torch.equal(biases[0], biases[1]) and biases[0].abs().sum() > 0


def test_grpo_raises_the_reward_it_is_given():
    """The policy gradient points the right way: plain GRPO on a random tiny model, rewarded for
    each '7' it writes, writes more of them (seeded: 0.13 sevens per rollout at the start)."""
    torch.manual_seed(0)  # the trainer seeds sampling; the initial weights are seeded here
    model = LlamaForCausalLM(LlamaConfig(**COMMON, intermediate_size=64)).eval()
    config = small_config("vanilla_grpo", learning_rate=1e-3, num_generations=8, max_new_tokens=8)
    trainer = PADDTrainer(
        model, None, char_tokenizer(), config, reward_fn=lambda text, p: float(text.count("7"))
    )
    rewards = [trainer.step(PROBLEMS)["reward"] for _ in range(30)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.5, rewards


def test_rollout_batch_select_groups_takes_whole_groups_in_order():
    tok = char_tokenizer()
    batch = generate(tiny_student(), tok, [format_prompt(p.question) for p in PROBLEMS], num_generations=2,
                     do_sample=True, max_new_tokens=4)  # fmt: skip
    sub = batch.select_groups(torch.tensor([0, 2]), 2)
    rows = [0, 1, 4, 5]
    assert torch.equal(sub.sequences_BS, batch.sequences_BS[rows])
    assert torch.equal(sub.attention_mask_BS, batch.attention_mask_BS[rows])
    assert torch.equal(sub.response_mask_BR, batch.response_mask_BR[rows])
    assert sub.completions == [batch.completions[i] for i in rows]
    assert sub.prompt_length == batch.prompt_length


def test_dynamic_sampling_updates_on_the_prompts_whose_rewards_differ():
    """Four prompts, dynamic_sampling=2: the reward is constant on two of them, so the update sees
    exactly the rollouts of the other two (read back from the prompts of the rows it got)."""
    constant = {PROBLEMS[0].question, PROBLEMS[2].question}
    problems = [*PROBLEMS, Problem("8-1?", "8-1=7\n#### 7", "7", "sub")]

    def reward(text, problem):
        return 1.0 if problem.question in constant else digit_count(text, problem)

    tok = char_tokenizer()
    trainer = PADDTrainer(tiny_student(), tiny_teacher(), tok, small_config(seed=2, dynamic_sampling=2),
                          reward_fn=reward)  # fmt: skip
    seen = {}
    update = trainer._update

    def capture(batch, adv_B, *rest):
        seen.update(batch=batch, adv=adv_B)
        return update(batch, adv_B, *rest)

    trainer._update = capture
    m = trainer.step(problems)
    batch, G = seen["batch"], trainer.config.num_generations
    prompts = tok.batch_decode(batch.sequences_BS[:, : batch.prompt_length], skip_special_tokens=True)
    expected = [format_prompt(q) for q in (PROBLEMS[1].question, problems[3].question) for _ in range(G)]
    assert prompts == expected
    assert (seen["adv"].view(2, G).abs().sum(1) > 0).all()
    assert m["informative_groups"] == pytest.approx(0.5)
    assert (m["prompts_sampled"], m["prompts_updated"]) == (4, 2)
    assert m["kept_informative_groups"] == 1.0
    with pytest.raises(ValueError, match="multiple"):
        trainer.step(problems[:3])
