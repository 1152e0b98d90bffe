"""Mixed calibration (a text AND text the model samples itself, --calibration-mix): seeded, the statistics summed
over both sources, and the held-out tokens of --size's choice never in them."""
from __future__ import annotations

import pytest
import torch

from globe.assets import DEFAULT_MODEL_DIR
from globe.errors import ConfigError
from globe.eval import encode_text
from globe.run.calibrate import CalibrateRun, check_calibrate_run, interleave_rows, run_calibrate_with_ids
from globe.run.size_choice import held_out
from globe.run.tokenizer import load_tokenizer

MODEL = str(DEFAULT_MODEL_DIR)
TEXT = DEFAULT_MODEL_DIR / "heldout.txt"
WINDOW = 32


def _run(tmp_path, name: str, text, tokens: int, own: int = 0, seed: int = 0):
    cal = CalibrateRun(MODEL, str(text) if text else None, str(tmp_path / f"{name}.safetensors"), max_tokens=tokens,
                       window=WINDOW, seed=seed, self_tokens=own, routed=8)
    return (*run_calibrate_with_ids(cal), cal)


def _text_ids():
    return encode_text(load_tokenizer(MODEL), TEXT.read_text(encoding="utf-8")[:20000])


def test_mixed_statistics_are_the_sums_over_the_text_and_the_self_generated_sample(tmp_path):
    mixed, ids, _ = _run(tmp_path, "mixed", TEXT, 128, own=96)
    text, text_ids, _ = _run(tmp_path, "text", TEXT, 128)
    own, own_ids, _ = _run(tmp_path, "self", None, 96)
    assert ids.shape == (7, WINDOW)                                    # 4 text windows and 3 sampled, interleaved
    assert torch.equal(ids, interleave_rows(text_ids.view(4, WINDOW), own_ids))
    assert mixed.tokens == text.tokens + own.tokens == 224
    assert torch.equal(mixed.counts, text.counts + own.counts)
    for name in ("hidden", "hidden_expert", "intermediate_expert", "gate_channels", "up_channels"):
        summed = getattr(text, name) + getattr(own, name)
        gap = (getattr(mixed, name) - summed).norm() / summed.norm()     # bf16 forwards batched otherwise
        assert gap < 2e-3, name
    assert not torch.allclose(mixed.hidden_expert, text.hidden_expert)  # the sample adds to every layer's sums
    info = mixed.info["calibration"]
    assert info["source"] == "text" and info["tokens"] == 128 and info["total_tokens"] == 224
    assert info["self_generated"]["tokens"] == 96 and info["self_generated"]["seed"] == 0
    assert mixed.routed is not None                                    # the routed samples see both sources too


def test_mixed_calibration_is_seeded(tmp_path):
    first, ids, _ = _run(tmp_path, "a", TEXT, 64, own=64, seed=3)
    again, ids_again, _ = _run(tmp_path, "b", TEXT, 64, own=64, seed=3)
    other, ids_other, _ = _run(tmp_path, "c", TEXT, 64, own=64, seed=4)
    assert torch.equal(ids, ids_again) and not torch.equal(ids, ids_other)
    assert torch.equal(ids[0::2], ids_other[0::2])                     # the text's rows: the same either way
    for name in ("hidden", "hidden_expert", "counts"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.hidden_expert, other.hidden_expert)


def test_held_out_text_tokens_stay_out_of_mixed_statistics(tmp_path):
    """--size's held-out tokens come from the text after those calibrated on (or its last share, taken away), and
    the mixed calibration's text rows are exactly the tokens before them."""
    all_ids = _text_ids()
    cal = CalibrateRun(MODEL, str(TEXT), str(tmp_path / "m.safetensors"), max_tokens=128, window=WINDOW,
                       self_tokens=64)
    held = held_out(MODEL, cal, seed=0, tokens=64)
    stats, ids = run_calibrate_with_ids(cal)
    assert held.info["first_token"] == 128 and torch.equal(held.ids.reshape(-1), all_ids[128:192])
    assert torch.equal(ids, interleave_rows(all_ids[:128].view(4, WINDOW), ids[[1, 3]]))   # t s t s t t
    held_rows = {tuple(r.tolist()) for r in held.ids.view(-1, WINDOW)}
    assert not held_rows & {tuple(r.tolist()) for r in ids}
    assert stats.tokens == 128 + 64
    short = tmp_path / "short.txt"
    short.write_text(TEXT.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    n = encode_text(load_tokenizer(MODEL), short.read_text(encoding="utf-8")).numel()
    cal = CalibrateRun(MODEL, str(short), str(tmp_path / "s.safetensors"), max_tokens=8192, window=WINDOW,
                       self_tokens=64)
    held = held_out(MODEL, cal, seed=0, tokens=64)
    first = held.info["first_token"]
    stats, ids = run_calibrate_with_ids(cal)
    assert cal.max_tokens == first < n
    assert stats.info["calibration"]["tokens"] == (first // WINDOW) * WINDOW   # whole windows before the held part
    assert stats.tokens == (first // WINDOW) * WINDOW + 64


def test_self_tokens_need_a_text_and_a_count():
    with pytest.raises(ConfigError, match="need a text"):
        check_calibrate_run(CalibrateRun(MODEL, None, "x", max_tokens=64, self_tokens=64))
    with pytest.raises(ConfigError, match=">= 2"):
        check_calibrate_run(CalibrateRun(MODEL, str(TEXT), "x", max_tokens=64, self_tokens=1))
