"""decode_speed: the step time is the difference of two generate timings; when noise makes it non-positive the
whole generate is timed instead (never an absurd speed)."""
import itertools

import torch

from globe.eval import speed


def test_decode_speed_never_divides_by_noise(monkeypatch):
    times = itertools.cycle([0.5, 0.6])            # long (new_tokens) then short (1 token): the short one was slower
    monkeypatch.setattr(speed, "_timed", lambda fn, device, repeats: next(times))
    model = torch.nn.Linear(2, 2)
    out = speed.decode_speed(model, torch.zeros(3, dtype=torch.long), new_tokens=2)
    assert out["decode_timing"] == "whole-generate" and out["decode_tok_s"] == 2 / 0.5


def test_decode_speed_uses_the_difference_when_it_is_positive(monkeypatch):
    times = itertools.cycle([1.0, 0.2])
    monkeypatch.setattr(speed, "_timed", lambda fn, device, repeats: next(times))
    out = speed.decode_speed(torch.nn.Linear(2, 2), torch.zeros(3, dtype=torch.long), new_tokens=5)
    assert out["decode_timing"] == "difference" and abs(out["decode_tok_s"] - 4 / 0.8) < 1e-9


def test_decode_speed_counts_every_sequence_of_a_batch(monkeypatch):
    times = itertools.cycle([1.0, 0.2])
    monkeypatch.setattr(speed, "_timed", lambda fn, device, repeats: next(times))
    out = speed.decode_speed(torch.nn.Linear(2, 2), torch.zeros(16, 3, dtype=torch.long), new_tokens=5)
    assert out["decode_batch"] == 16 and abs(out["decode_tok_s"] - 16 * 4 / 0.8) < 1e-9
