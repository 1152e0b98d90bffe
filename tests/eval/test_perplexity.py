"""Sliding-window perplexity against direct computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from globe.errors import ConfigError
from globe.eval import encode_text, perplexity
from tests.helpers.fits import char_tokenizer


def _ids(n: int) -> torch.Tensor:
    return torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """NLL of every token after the first, with the whole prefix as context: [n - 1]."""
    logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
    return F.cross_entropy(logits.float(), ids[1:], reduction="none")


def test_one_window_equals_the_full_sequence_loss(tiny_model):
    model, ids = tiny_model("qwen2_moe"), _ids(40)
    out = perplexity(model, ids, max_length=64)
    assert out["tokens"] == 39 and out["windows"] == 1
    assert out["perplexity"] == pytest.approx(math.exp(float(_token_nll(model, ids).mean())), rel=1e-5)


def test_overlapping_windows_score_every_token_once_with_context(tiny_model):
    model, ids = tiny_model("mixtral"), _ids(50)
    out = perplexity(model, ids, max_length=20, stride=10)
    assert out["tokens"] == 49 and out["windows"] == 4
    expected = []
    for begin, first in ((0, 1), (10, 20), (20, 30), (30, 40)):     # window start, first target it scores
        window = ids[begin:begin + 20]
        expected.append(_token_nll(model, window)[first - begin - 1:])
    assert out["nll"] == pytest.approx(float(torch.cat(expected).mean()), rel=1e-5)


def test_disjoint_windows_skip_each_windows_first_token(tiny_model):
    out = perplexity(tiny_model("olmoe"), _ids(45), max_length=20, max_tokens=40)
    assert out["windows"] == 2 and out["tokens"] == 38 and out["stride"] == 20


def test_bad_windows_are_rejected(tiny_model):
    with pytest.raises(ConfigError, match="stride <= max_length"):
        perplexity(tiny_model("olmoe"), _ids(10), max_length=4, stride=8)
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        perplexity(tiny_model("olmoe"), _ids(1))


def test_encode_text_uses_no_special_tokens(tmp_path):
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(char_tokenizer(tmp_path))
    assert encode_text(tok, "ab a").tolist() == [4, 5, 3, 4]
