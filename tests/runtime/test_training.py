"""A compressed model trains like any model: every load path (from_pretrained in fp32 / bf16, load_compressed in
each mode) takes several AdamW steps with gradients on the bank, code values, adapters and untouched parameters;
the caches follow the factors (an optimizer step or an in-place edit shows in the next forward exactly as in a
fresh load); save_pretrained writes what was trained; the HF Trainer runs."""
from __future__ import annotations

import pytest
import torch
import transformers

import globe  # noqa: F401  (registers the quantizer)
from globe.export import load_compressed, save_compressed
from globe.runtime import globe_modules, set_mode
from tests.helpers.fits import quick_fit


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    return save_compressed(path, quick_fit(path), tmp_path_factory.mktemp("train") / "c")


def _ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _load(path, how: str, dtype=torch.float32):
    if how == "from_pretrained":
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu")
    return load_compressed(path, mode=how, dtype=dtype)


@torch.no_grad()
def _loss(model) -> float:
    return model(input_ids=_ids(), labels=_ids(), use_cache=False).loss.item()


@pytest.mark.parametrize("how, dtype", [("from_pretrained", torch.float32), ("from_pretrained", torch.bfloat16),
                                        ("dense", torch.float32), ("cached", torch.float32),
                                        ("factored", torch.bfloat16)])
def test_every_load_path_trains_with_adamw(compressed, how, dtype):
    model = _load(compressed, how, dtype)
    params = dict(model.named_parameters())
    assert all(p.requires_grad for p in params.values() if p.is_floating_point())      # trainable like any model
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):                                                  # no "backward through the graph twice"
        opt.zero_grad()
        model(input_ids=_ids(), labels=_ids(), use_cache=False).loss.backward()
        grads = {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
    for part in (".bank.gate", ".code_values.gate", ".adapters.up", ".down_proj", "embed_tokens"):
        assert any(part in n for n in grads), part
    moved = [n for n in params if ".bank." in n and not torch.equal(params[n].detach(), before[n])]
    assert moved


@pytest.mark.parametrize("mode", ["cached", "dense", "factored"])
def test_a_trained_model_equals_itself_saved_and_reloaded(compressed, tmp_path, mode):
    model = load_compressed(compressed, mode=mode, dtype=torch.float32)
    _loss(model)                                                        # fill the caches
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(input_ids=_ids(), labels=_ids(), use_cache=False).loss.backward()
    opt.step()
    trained = _loss(model)
    model.save_pretrained(tmp_path / "again")
    again = load_compressed(tmp_path / "again", mode=mode, dtype=torch.float32)
    assert trained == pytest.approx(_loss(again), abs=1e-5)
    assert trained != pytest.approx(_loss(load_compressed(compressed, mode=mode, dtype=torch.float32)), abs=1e-4)


@pytest.mark.parametrize("mode", ["cached", "dense"])
def test_an_in_place_edit_after_a_forward_shows_in_the_next_one(compressed, mode):
    model, fresh = (load_compressed(compressed, mode=mode, dtype=torch.float32) for _ in range(2))
    _loss(model)
    with torch.no_grad():
        for m in (model, fresh):
            globe_modules(m)[0].bank["gate"].zero_()                    # shared by every layer
    assert _loss(model) == _loss(fresh)


def test_set_mode_after_training_keeps_the_trained_factors(compressed):
    model = load_compressed(compressed, mode="factored", dtype=torch.float32)
    with torch.no_grad():
        globe_modules(model)[0].adapters["up"].mul_(0.5)
    factored = _loss(model)
    set_mode(model, "dense")
    assert _loss(model) == pytest.approx(factored, abs=1e-5)


def test_hf_trainer_runs_on_a_compressed_model(compressed, tmp_path):
    from torch.utils.data import Dataset

    class Rows(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict:
            ids = _ids()[i % 2]
            return {"input_ids": ids, "labels": ids}

    model = _load(compressed, "from_pretrained")
    bank = globe_modules(model)[0].bank["gate"].detach().clone()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=3, per_device_train_batch_size=2,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Rows()).train()
    assert not torch.equal(globe_modules(model)[0].bank["gate"].detach(), bank)


def test_peft_target_parameters_on_a_factored_projection_is_refused_in_one_line(compressed):
    peft = pytest.importorskip("peft")
    from globe.errors import ConfigError
    model = _load(compressed, "from_pretrained")
    with pytest.raises(ConfigError, match=r"'gate_up_proj' names a GloBE-factored projection") as info:
        peft.get_peft_model(model, peft.LoraConfig(r=2, target_parameters=["gate_up_proj", "down_proj"]))
    assert "\n" not in str(info.value)


def test_peft_lora_on_untouched_experts_and_attention_trains(compressed):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_load(compressed, "dense"),
                                peft.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["down_proj"]))
    model(input_ids=_ids(), labels=_ids(), use_cache=False).loss.backward()
    lora = {n for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    assert any("experts" in n for n in lora) and any("q_proj" in n for n in lora)
