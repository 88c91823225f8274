"""padd's decode loop (`padd.training.decode`) against its oracle, transformers' `model.generate`:
the same tokens, greedy and sampled under one seed, on a tiny random Llama and a tiny Mixtral,
with left padding, EOS in the middle of some rows, repeated prompts, temperature and top-p."""

import pytest
import torch
from test_trainer import COMMON, char_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from padd.data.problem import format_prompt
from padd.moe.hf_experts import use_experts
from padd.training import decode as padd_decode
from padd.training.rollout import generate

PROMPTS = [format_prompt("3+4?"), format_prompt("12*34+5?"), format_prompt("9-5?")]  # lengths differ


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _llama(seed: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**COMMON, intermediate_size=64)).eval()


def _mixtral(seed: int = 0, experts: str | None = None) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    model = MixtralForCausalLM(
        MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    ).eval()
    return use_experts(model, experts) if experts else model


MODELS = {"llama": _llama, "mixtral": _mixtral, "mixtral@padd": lambda: _mixtral(experts="padd")}


def _encode(prompts=PROMPTS):
    enc = char_tokenizer()(prompts, return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


def _oracle(model, ids, mask, repeats, seed, **kw):
    torch.manual_seed(seed)
    return model.generate(
        input_ids=ids.repeat_interleave(repeats, 0),
        attention_mask=mask.repeat_interleave(repeats, 0),
        **kw,
    )


def _ours(model, ids, mask, repeats, seed, eos_token_id=None, **kw):
    assert padd_decode.supported(model, **{k: v for k, v in kw.items() if k != "pad_token_id"})
    torch.manual_seed(seed)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    return padd_decode.decode(model, ids, mask, repeats=repeats, eos_token_id=eos, **kw)


def _first(responses: torch.Tensor, tok: int) -> list[int]:
    """Per row, the column of the first `tok` (the row's length when absent)."""
    hit = responses == tok
    return torch.where(hit.any(1), hit.int().argmax(1), responses.shape[1]).tolist()


def _mid_eos(model, ids, mask, **kw) -> int:
    """A token that greedy decoding emits mid-way in some rows and at other steps (or never) in
    others: as EOS, it ends rows at different steps."""
    out = _oracle(model, ids, mask, 1, 0, eos_token_id=None, **kw)[:, ids.shape[1] :]
    for tok in out[:, 1:-1].reshape(-1).tolist():
        if tok > 2 and len(set(_first(out, tok))) > 1:
            return tok
    pytest.skip("no token to use as a mid-sequence EOS in this random model")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_is_transformers_generate(name):
    model = MODELS[name]()
    ids, mask = _encode()
    greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None, max_new_tokens=10)
    greedy["pad_token_id"] = 0
    eos = _mid_eos(model, ids, mask, **greedy)
    want = _oracle(model, ids, mask, 2, 0, eos_token_id=[eos], **greedy)
    got = _ours(model, ids, mask, 2, 0, eos_token_id=[eos], **greedy)
    assert torch.equal(got, want)
    ends = _first(got[:, ids.shape[1] :], eos)
    assert min(ends) < got.shape[1] - ids.shape[1] - 1 and len(set(ends)) > 1  # rows end apart


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_sampling_draws_generates_tokens_under_one_seed(name, temperature, top_p):
    model = MODELS[name]()
    with torch.no_grad():  # EOS likely enough that rows end at different steps
        model.lm_head.weight[1] = model.lm_head.weight[1] * 0.0
        model.lm_head.bias = None
    ids, mask = _encode()
    kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=12)
    kw["pad_token_id"] = 0
    for seed in range(3):
        want = _oracle(model, ids, mask, 4, seed, eos_token_id=[1], **kw)
        got = _ours(model, ids, mask, 4, seed, eos_token_id=[1], **kw)
        assert torch.equal(got, want), seed
        ends = _first(got[:, ids.shape[1] :], 1)
        assert min(ends) < got.shape[1] - ids.shape[1] - 1 and len(set(ends)) > 1  # rows end apart


def test_no_padding_and_no_eos():
    """Prompts of one length: generate drops the all-ones mask, and so must we."""
    model = _mixtral(experts="padd")
    ids, mask = _encode([format_prompt("3+4?"), format_prompt("5+6?")])
    assert bool(mask.all())
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6, pad_token_id=0)
    want = _oracle(model, ids, mask, 3, 5, eos_token_id=None, **kw)
    got = _ours(model, ids, mask, 3, 5, eos_token_id=None, **kw)
    assert torch.equal(got, want) and got.shape[1] == ids.shape[1] + 6


def test_suppressed_tokens_are_never_sampled():
    model = _llama()
    model.generation_config.suppress_tokens = [1]
    ids, mask = _encode()
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8, pad_token_id=0)
    want = _oracle(model, ids, mask, 2, 0, eos_token_id=[1], **kw)
    got = _ours(model, ids, mask, 2, 0, eos_token_id=[1], **kw)
    assert torch.equal(got, want) and not (got[:, ids.shape[1] :] == 1).any()


def test_other_generation_settings_fall_back_to_generate():
    model = _llama()
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8)
    assert padd_decode.supported(model, **kw)
    model.generation_config.repetition_penalty = 1.3
    assert not padd_decode.supported(model, **kw)
    model.generation_config.repetition_penalty = 1.0
    model.config.sliding_window = 4  # a sliding-window cache: not this loop's
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    assert not padd_decode.supported(model, **kw)


@pytest.mark.parametrize("do_sample", [True, False])
def test_rollout_generate_is_the_old_path(do_sample):
    """`rollout.generate` on padd's loop gives the RolloutBatch that `model.generate` gave."""
    model, tok = _mixtral(experts="padd"), char_tokenizer()
    kw = dict(num_generations=3, do_sample=do_sample, temperature=0.8, top_p=0.95, max_new_tokens=9)
    torch.manual_seed(11)
    old = generate(model, tok, PROMPTS, use_padd_decode=False, **kw)
    torch.manual_seed(11)
    new = generate(model, tok, PROMPTS, **kw)
    assert torch.equal(new.sequences_BS, old.sequences_BS)
    assert torch.equal(new.attention_mask_BS, old.attention_mask_BS)
    assert torch.equal(new.response_mask_BR, old.response_mask_BR)
    assert new.completions == old.completions and new.prompt_length == old.prompt_length


def test_trainer_step_is_the_old_paths_step(monkeypatch):
    """A whole PADD step (rollouts, teacher's greedy check, update) on padd's decode gives the
    metrics and weights it gave on `model.generate`, from the same seed."""
    from test_trainer import PROBLEMS, small_config, tiny_student, tiny_teacher

    from padd.training.trainer import PADDTrainer

    def run(use_padd: bool):
        with monkeypatch.context() as patch:
            if not use_padd:
                patch.setattr(padd_decode, "supported", lambda *a, **k: False)
            cfg = small_config(kd_on="teacher_correct", num_generations=3)
            trainer = PADDTrainer(tiny_student(), tiny_teacher(), char_tokenizer(), cfg)
            metrics = [trainer.step(PROBLEMS) for _ in range(2)]
        return [{k: v for k, v in m.items() if not k.startswith("time_")} for m in metrics], trainer.student

    old_metrics, old_student = run(False)
    new_metrics, new_student = run(True)
    assert new_metrics == old_metrics
    for a, b in zip(old_student.parameters(), new_student.parameters(), strict=True):
        assert torch.equal(a, b)
