"""KL(original || compressed) and top-1 agreement on planted pairs of models whose KL is computed here by hand from
the logits: a model against itself (0, agreement 1) and against a copy whose lm_head is scaled (logits scaled)."""
from __future__ import annotations

import copy

import pytest
import torch

from globe.errors import ConfigError
from globe.eval import divergence, perplexity


def _ids(n: int) -> torch.Tensor:
    return torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(1))


def _scaled(model, factor: float):
    """A copy of `model` whose logits are `factor` times the original's (lm_head has no bias)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_output_embeddings().weight.mul_(factor)
    return other


@torch.no_grad()
def _by_hand(model, factor: float, ids: torch.Tensor) -> tuple[float, float]:
    """(mean KL, top-1 agreement) of softmax(z) against softmax(factor z) over every next-token position."""
    z = model(input_ids=ids[None], use_cache=False).logits[0, :-1].double()          # [n - 1, V]
    p, q = torch.softmax(z, -1), torch.softmax(factor * z, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    return float(kl), float((z.argmax(-1) == (factor * z).argmax(-1)).double().mean())


def test_a_model_against_itself_has_zero_kl_and_full_agreement(tiny_model):
    model, ids = tiny_model("qwen2_moe"), _ids(50)
    div = divergence(model, model, ids, max_length=16, stride=8)
    assert div["kl"] == 0.0 and div["top1"] == 1.0 and div["tokens"] == 49
    assert div["perplexity"] == div["reference_perplexity"]
    assert div["perplexity"] == pytest.approx(perplexity(model, ids, 16, 8)["perplexity"], rel=1e-6)


@pytest.mark.parametrize("factor", [2.0, 0.5, -1.0])
def test_scaled_logits_give_the_kl_computed_by_hand(tiny_model, factor):
    model, ids = tiny_model("qwen2_moe"), _ids(40)
    other = _scaled(model, factor)
    div = divergence(model, other, ids, max_length=64)                                # one window: full context
    kl, top1 = _by_hand(model, factor, ids)
    assert kl > 1e-3
    assert div["kl"] == pytest.approx(kl, rel=1e-4)
    assert div["top1"] == pytest.approx(top1) and (top1 == 1.0) == (factor > 0)
    assert div["tokens"] == 39 and div["kl_max"] >= div["kl"]
    assert div["perplexity"] == pytest.approx(perplexity(other, ids, 64)["perplexity"], rel=1e-5)
    assert div["reference_perplexity"] == pytest.approx(perplexity(model, ids, 64)["perplexity"], rel=1e-5)


def test_windows_score_every_token_once_like_perplexity(tiny_model):
    model, ids = tiny_model("qwen2_moe"), _ids(70)
    other = _scaled(model, 2.0)
    div = divergence(model, other, ids, max_length=16, stride=5)
    ppl = perplexity(other, ids, 16, 5)
    assert (div["tokens"], div["windows"]) == (ppl["tokens"], ppl["windows"]) == (69, ppl["windows"])
    assert div["perplexity"] == pytest.approx(ppl["perplexity"], rel=1e-5)
    capped = divergence(model, other, ids, max_length=16, max_tokens=33)
    assert capped["tokens"] == perplexity(other, ids, 16, max_tokens=33)["tokens"]


def test_too_few_tokens_or_other_vocabularies_are_refused(tiny_model):
    model = tiny_model("qwen2_moe")
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        divergence(model, model, torch.tensor([5]))
    with pytest.raises(ConfigError, match="stride"):
        divergence(model, model, _ids(10), max_length=4, stride=5)
    other = copy.deepcopy(model)
    other.resize_token_embeddings(80)
    with pytest.raises(ConfigError, match="same vocabulary"):
        divergence(model, other, _ids(10))
