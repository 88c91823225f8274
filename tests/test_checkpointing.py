"""Trainer checkpoints (`padd.training.checkpointing`): a resume copies every saved tensor back into
the live student bit for bit, in place and without building a second model, and the next step is
the uninterrupted run's; checkpoints in transformers' layout (the final student, and every
checkpoint written before the layout was recorded) still resume; writes are atomic."""

import copy
import os
import random

import numpy as np
import pytest
import torch
from moe_tiny_models import tiny_model
from safetensors import safe_open
from test_trainer import COMMON, PROBLEMS, char_tokenizer, small_config, tiny_student
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedModel

from padd.moe.routing_control import RoutingControl
from padd.training.checkpointing import TRAINER_STATE_FILE, TrainerState, rng_state, set_rng_state
from padd.training.trainer import PADDTrainer


def _without_times(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith("time_")}


def _student(name: str, seed: int = 0):
    if name == "mixtral":
        return tiny_student(seed)
    if name == "mixtral_tied":  # `save_pretrained` leaves lm_head.weight out of the file
        torch.manual_seed(seed)
        cfg = MixtralConfig(
            **{**COMMON, "tie_word_embeddings": True},
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
        )
        return MixtralForCausalLM(cfg).eval()
    if name == "mixtral_bf16":
        return tiny_student(seed).to(torch.bfloat16)
    return tiny_model(name, seed)  # qwen3_moe, qwen2_moe (its shared expert and gate too)


STUDENTS = ("mixtral", "mixtral_tied", "mixtral_bf16", "qwen3_moe", "qwen2_moe")


def _trainer(student, **overrides) -> PADDTrainer:
    # No teacher needed: only the checkpoint's contents matter here.
    return PADDTrainer(student, None, char_tokenizer(), small_config("no_stage2", seed=5, **overrides))


def _tensors(trainer: PADDTrainer) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the student, the bias and the EMA, cloned."""
    out = {f"param:{n}": p.detach().clone() for n, p in trainer.student.named_parameters()}
    out |= {f"buffer:{n}": b.clone() for n, b in trainer.student.named_buffers()}
    return out | {"bias": trainer.control.selection_bias.clone(), "ema": trainer.ema_state.clone()}


def _assert_bit_identical(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


@pytest.fixture
def no_second_model(monkeypatch):
    """Resuming from a live-layout checkpoint must not build a model: `from_pretrained` fails."""

    def refuse(*args, **kwargs):
        raise AssertionError("load_checkpoint built a second model")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", refuse)  # every model class's


@pytest.mark.parametrize("name", STUDENTS)
def test_resume_restores_every_tensor_in_place_and_continues_the_run(name, tmp_path, no_second_model):
    trainer = _trainer(_student(name))
    trainer.step(PROBLEMS[:2])
    saved = _tensors(trainer)
    trainer.save_checkpoint(tmp_path / "ckpt")
    # The oracle: the uninterrupted next step, from the state just saved.
    expected_metrics = _without_times(trainer.step(PROBLEMS[:2]))
    expected_after = _tensors(trainer)

    # Move everything away from the saved state (the step above did most of it already).
    with torch.no_grad():
        for p in trainer.student.parameters():
            p.add_(torch.randn_like(p))
    trainer.control.selection_bias.add_(1.0)
    trainer.ema_state.add_(1.0)
    trainer.step_count, trainer.skipped_updates = 99, 7
    storage = {n: p.data_ptr() for n, p in trainer.student.named_parameters()}

    trainer.load_checkpoint(tmp_path / "ckpt")

    _assert_bit_identical(_tensors(trainer), saved)
    assert trainer.step_count == 1 and trainer.skipped_updates == 0
    # Copied into the live tensors: the optimiser still holds the student's parameters.
    assert {n: p.data_ptr() for n, p in trainer.student.named_parameters()} == storage
    assert _without_times(trainer.step(PROBLEMS[:2])) == expected_metrics
    _assert_bit_identical(_tensors(trainer), expected_after)


def _write_pre_layout_checkpoint(trainer: PADDTrainer, directory) -> None:
    """A checkpoint as padd wrote it before the weights' layout was recorded: `save_pretrained`'s
    default (transformers' original layout: Mixtral's per-expert w1/w2/w3) and a plain dict."""
    os.makedirs(directory)
    trainer.student.save_pretrained(directory)
    trainer.control.save_selection_bias(directory)
    rng = {k: v for k, v in rng_state().items() if k != "cuda"}  # the old trainer's keys on CPU
    state = {
        "selection_bias": trainer.control.selection_bias,
        "ema_state": trainer.ema_state,
        "step": trainer.step_count,
        "rng": rng,
        "config": trainer.config.to_dict() | {"use_drift": True},
        "reference": None,
        "optimizer": trainer.optimizer.state_dict(),
    }
    torch.save(state, directory / TRAINER_STATE_FILE)


@pytest.mark.parametrize("writer", ["pre_layout", "hf_layout"])
def test_checkpoints_in_transformers_layout_resume(writer, tmp_path):
    a = _trainer(tiny_student())
    a.step(PROBLEMS[:2])
    saved = _tensors(a)
    if writer == "pre_layout":
        _write_pre_layout_checkpoint(a, tmp_path / "ckpt")
    else:
        a.write_checkpoint(tmp_path / "ckpt", a.gather_checkpoint(), hf_layout=True)
    with safe_open(tmp_path / "ckpt" / "model.safetensors", framework="pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in f.keys()  # not the live layout
    expected = _without_times(a.step(PROBLEMS[:2]))

    b = _trainer(tiny_student(seed=9))
    b.load_checkpoint(tmp_path / "ckpt")
    _assert_bit_identical(_tensors(b), saved)
    assert b.step_count == 1 and _without_times(b.step(PROBLEMS[:2])) == expected


def test_a_checkpoint_folder_stays_a_transformers_model(tmp_path):
    trainer = _trainer(_student("qwen3_moe"))
    trainer.step(PROBLEMS[:2])
    trainer.save_checkpoint(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    live = trainer.student.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, live[name]), name
    bias = RoutingControl(loaded).load_selection_bias(tmp_path / "ckpt")
    assert torch.equal(bias, trainer.control.selection_bias)


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(tiny_student())
    trainer.save_checkpoint(tmp_path / "ckpt")
    saved = _tensors(trainer)
    trainer.step(PROBLEMS[:2])

    def crash(directory, checkpoint, **kwargs):
        (directory / "model.safetensors").write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(trainer, "write_checkpoint", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left behind
    monkeypatch.undo()
    trainer.load_checkpoint(tmp_path / "ckpt")
    _assert_bit_identical(_tensors(trainer), saved)


def test_resume_refuses_weights_that_do_not_fit(tmp_path):
    _trainer(tiny_student()).save_checkpoint(tmp_path / "ckpt")
    bf16 = _trainer(_student("mixtral_bf16"))
    with pytest.raises(ValueError, match=r"saved torch.float32 .* model torch.bfloat16"):
        bf16.load_checkpoint(tmp_path / "ckpt")
    other = _trainer(_student("qwen3_moe"))
    with pytest.raises(ValueError, match="do not match the model: missing"):
        other.load_checkpoint(tmp_path / "ckpt")


def test_reference_policy_is_restored_and_routes_without_the_callers_hooks(tmp_path):
    """β > 0: the reference is the initial student as transformers computes it, even when the
    caller's RoutingControl hooked the student before the trainer copied it."""
    student = tiny_student()
    oracle = copy.deepcopy(student)  # copied before any hook
    control = RoutingControl(student)
    trainer = PADDTrainer(student, None, char_tokenizer(), small_config("no_stage2", beta=0.1), control)
    control.selection_bias.fill_(0.0)
    control.selection_bias[:, :2] = -100.0  # the policy never picks experts 0 and 1
    ids = torch.randint(3, 40, (2, 7))
    with control.capturing():
        ref_logits = trainer.reference(input_ids=ids).logits
        assert all(z is None for z in control.router_logits)  # the copy fed nothing to the control
    assert torch.equal(ref_logits, oracle(input_ids=ids).logits)
    assert not torch.equal(student(input_ids=ids).logits, ref_logits)  # the student is still hooked

    trainer.save_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        for p in trainer.reference.parameters():
            p.add_(1.0)
    trainer.load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(trainer.reference(input_ids=ids).logits, ref_logits)


def test_trainer_state_names_an_unknown_key():
    with pytest.raises(ValueError, match="unknown TrainerState key"):
        TrainerState.from_dict({"step": 0, "bogus": 1})


def test_rng_state_round_trip_continues_every_stream():
    state = rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    second = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
