"""globe.run.size_choice: `globe compress --size` builds every kind of family that fits and keeps the one with the
lowest KL on held-out calibration tokens: plain quantization where it is clearly better, factors where they are,
the same choice on every run (seeded), and the choice recorded in the fit's source, the output and the model card.
No network: the models are built here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import globe.cli.main as cli
from globe.fit.config import FitConfig, QuantSection, TrainConfig
from globe.fit.planning.bytes import GIB, SizePlan, size_plans, source_bytes
from globe.io import open_checkpoint
from globe.run.size_choice import HeldOut, fit_candidates

QUICK = TrainConfig(am_iters=2, varpro_steps=3)


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory) -> Path:
    """The small upcycled Qwen2-MoE of tests.helpers.scripts.small_upcycled (for the byte model (headers) only)."""
    from tests.helpers.scripts import small_upcycled
    return small_upcycled(tmp_path_factory.mktemp("choice") / "ckpt")


@pytest.fixture(scope="module")
def shared_experts(tmp_path_factory) -> Path:
    """A tiny Qwen2-MoE whose experts in each layer are all the same matrix: factors (one atom, full rank) hold them
    exactly, 2-bit quantization does not."""
    from tests.helpers.tiny_models import make_tiny_checkpoint, make_tiny_model
    model = make_tiny_model("qwen2_moe", seed=0)
    with torch.no_grad():
        for layer in (layer for layer in model.model.layers if hasattr(layer.mlp, "experts")):
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(layer.mlp.experts, name)
                w.copy_(w[:1].expand_as(w))
    return make_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("shared"), model=model)


def _plan(kind: str, bits: int | None, budget: float, support: int = 2, rbits: int | None = None,
          rgroup: int | None = None) -> SizePlan:
    return SizePlan(0, bits, budget, support, 0, 0, 0, 0.0, kind, rbits, rgroup)


def _held() -> HeldOut:
    return HeldOut(None, {"source": "self-generated", "tokens": 192, "seed": 1, "length": 32})


def _choose(path: Path, plans: list[SizePlan], work: Path):
    work.mkdir(parents=True)
    cfg = FitConfig(train=QUICK, quant=QuantSection(group=8))
    return fit_candidates(str(path), cfg, plans, work, _held(), str(work / "metrics.jsonl"))


def test_plain_is_kept_where_it_is_clearly_better(tiny_checkpoint, tmp_path):
    """8-bit plain quantization against a starved factor fit of random experts (budget 0.2): plain."""
    plans = [_plan("factors", 4, 0.2), _plan("plain", 4, 0.0, 1, 8, 32)]
    result = _choose(tiny_checkpoint("qwen2_moe"), plans, tmp_path / "a")
    choice = result.source["size"]["choice"]
    kls = {c["kind"]: c["kl"] for c in choice["candidates"]}
    assert choice["chosen"] == result.source["size"]["kind"] == "plain" and kls["plain"] < 0.5 * kls["factors"]
    assert result.families["gate"].bank.shape[1] == 0 and "residual" in result.families["gate"].quant
    assert all(c["bytes"] > 0 and c["bits_per_weight"] > 0 for c in choice["candidates"])
    assert (tmp_path / "a" / "metrics.jsonl").is_file()


def test_factors_are_kept_where_they_are_better_and_the_choice_is_seeded(shared_experts, tmp_path):
    """Unquantized factors with room for the shared expert against 2-bit plain quantization: factors, twice the same
    (same KLs to the bit)."""
    plans = [_plan("plain", 4, 0.0, 1, 2, 32), _plan("factors", None, 0.6, 1)]
    first = _choose(shared_experts, plans, tmp_path / "a").source["size"]["choice"]
    again = _choose(shared_experts, plans, tmp_path / "b").source["size"]["choice"]
    kls = {c["kind"]: c["kl"] for c in first["candidates"]}
    assert first["chosen"] == "factors" and kls["factors"] < 0.5 * kls["plain"]
    assert [c["kl"] for c in first["candidates"]] == [c["kl"] for c in again["candidates"]]
    assert again["chosen"] == first["chosen"]


def test_size_plans_lists_every_kind_that_fits(upcycled):
    with open_checkpoint(upcycled) as reader:
        other, dense = source_bytes(reader, ("gate", "up"))
    routed = sum(dense.values()) // 2
    cfg = FitConfig(quant=QuantSection(group=8))
    plans = size_plans(cfg, upcycled, (other + int(routed * 3.0 / 8)) / GIB)
    assert [p.kind for p in plans] == ["factors", "plain"] and plans[1].residual_bits == 2
    plans = size_plans(cfg, upcycled, (other + int(routed * 4.6 / 8)) / GIB)
    assert [p.kind for p in plans] == ["plain", "factors"]
    assert [p.kind for p in size_plans(cfg, upcycled, (other + int(routed * 3.0 / 8)) / GIB, bits_given=True)] \
        == ["factors"]
    assert cfg.quant.bits is None and cfg.bank.budget == FitConfig().bank.budget          # cfg unchanged


def test_compress_size_records_the_candidates_in_source_output_and_card(tiny_checkpoint, tmp_path, capsys):
    path = tiny_checkpoint("qwen2_moe")
    with open_checkpoint(path) as reader:
        other, dense = source_bytes(reader, ("gate", "up"))
    size = (other + int(sum(dense.values()) // 4 * 4.6 / 8)) / GIB          # fp32: 4 bytes per weight
    out = tmp_path / "c"
    assert cli.main(["compress", str(path), "-o", str(out), "--size", f"{size:.12g}", "--quant-group", "8",
                     "--calibration-tokens", "256", "--activation-steps", "1",
                     "--am-iters", "1", "--varpro-steps", "1", "--distill-steps", "0"]) == 0
    printed = capsys.readouterr().out
    size_doc = json.loads((out / "globe_config.json").read_text())["source"]["size"]
    choice = size_doc["choice"]
    assert [c["kind"] for c in choice["candidates"]] == ["plain", "factors"]
    best = min(choice["candidates"], key=lambda c: c["kl"])
    assert choice["chosen"] == size_doc["kind"] == best["kind"]
    assert choice["held_out"]["source"] == "self-generated" and choice["held_out"]["seed"] == 1
    assert "kind chosen by KL on" in printed and f"-> {choice['chosen']}" in printed
    card = (out / "README.md").read_text()
    assert card.count("`--size` candidate:") == 2 and "| chosen |" in card


def test_held_out_text_tokens_are_never_in_the_statistics(tmp_path):
    """--calibration-text: the tokens after those calibrated on; a text with too few: its last share, taken away from
    the calibration (max_tokens lowered before it runs)."""
    from globe.assets import DEFAULT_MODEL_DIR
    from globe.eval import encode_text
    from globe.run.calibrate import CalibrateRun
    from globe.run.size_choice import held_out
    from globe.run.tokenizer import load_tokenizer
    text = DEFAULT_MODEL_DIR / "heldout.txt"
    ids = encode_text(load_tokenizer(DEFAULT_MODEL_DIR), text.read_text(encoding="utf-8"))
    cal = CalibrateRun(str(DEFAULT_MODEL_DIR), str(text), "", max_tokens=256, window=64)
    held = held_out(str(DEFAULT_MODEL_DIR), cal, seed=0, tokens=128)
    assert cal.max_tokens == 256 and held.info["first_token"] == 256 and held.ids.shape == (2, 64)
    assert torch.equal(held.ids.reshape(-1), ids[256:384])
    short = tmp_path / "short.txt"
    short.write_text(text.read_text(encoding="utf-8")[:2000], encoding="utf-8")
    n = encode_text(load_tokenizer(DEFAULT_MODEL_DIR), short.read_text(encoding="utf-8")).numel()
    cal = CalibrateRun(str(DEFAULT_MODEL_DIR), str(short), "", max_tokens=8192, window=16)
    held = held_out(str(DEFAULT_MODEL_DIR), cal, seed=0, tokens=128)
    assert cal.max_tokens == held.info["first_token"] == n - int(n * 0.125) < n


def test_the_whole_expert_phase_runs_for_the_factors_candidate_and_is_off_for_plain_quantization():
    from globe.fit.config import FitConfig
    from globe.fit.planning.bytes import SizePlan
    from globe.run.size_choice import candidate_config
    cfg = FitConfig()
    cfg.expert.steps = 200
    factors = SizePlan(10**6, 4, 0.5, 8, 9 * 10**5, 10**5, 4 * 10**5, 2.5)
    plain = SizePlan(10**6, 4, 0.0, 1, 9 * 10**5, 10**5, 4 * 10**5, 2.5, "plain", 2, 128)
    kept = candidate_config(cfg, factors).validate()
    assert kept.expert.steps == 200 and kept.bank.budget == 0.5 and kept.quant.residual_bits is None
    off = candidate_config(cfg, plain).validate()                 # would be refused with the phase on
    assert off.expert.steps == 0 and off.quant.residual_bits == 2 and off.bank.budget == 0.0
    assert cfg.expert.steps == 200 and cfg.quant.residual_bits is None           # the caller's config untouched
