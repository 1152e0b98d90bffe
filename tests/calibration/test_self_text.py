"""Self-generated calibration text: seeded (same tokens twice, another seed other tokens), sampled from the model's
own distribution, shaped as asked, and made without any network access."""
from __future__ import annotations

import socket

import pytest
import torch

from globe.calibration.self_text import SelfText, self_generated_ids, start_tokens
from globe.errors import ConfigError


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_same_seed_same_tokens_other_seed_other_tokens(tiny_model, no_network):
    model = tiny_model("qwen2_moe")
    spec = SelfText(tokens=90, length=30, batch=2, seed=7)
    first, again = self_generated_ids(model, spec), self_generated_ids(model, spec)
    other = self_generated_ids(model, SelfText(tokens=90, length=30, batch=2, seed=8))
    assert first.shape == (3, 30) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert (first[:, 1:] != other[:, 1:]).float().mean() > 0.5
    assert bool((first[:, 0] == model.config.bos_token_id).all())                   # every sequence starts at BOS
    assert int(first.max()) < model.config.vocab_size and int(first.min()) >= 0


def test_tokens_follow_the_models_distribution(tiny_model):
    """At a low temperature sampling becomes greedy decoding: each token is the argmax after its prefix."""
    model = tiny_model("qwen2_moe")
    ids = self_generated_ids(model, SelfText(tokens=24, length=12, batch=2, temperature=1e-4))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]              # [rows, length - 1, V]
    assert torch.equal(logits.argmax(-1), ids[:, 1:])


def test_random_prefix_and_counts(tiny_model):
    model = tiny_model("qwen2_moe")
    ids = self_generated_ids(model, SelfText(tokens=41, length=20, batch=8, random_prefix=3, seed=1))
    assert ids.shape == (3, 20)                                                       # rounded up to whole sequences
    assert len(set(ids[:, 1].tolist())) > 1                                           # random starts differ
    assert start_tokens(model, SelfText(random_prefix=3)) == "its BOS token (1) and 3 uniformly random tokens"
    for bad in (SelfText(tokens=1), SelfText(length=1), SelfText(temperature=0.0), SelfText(batch=0)):
        with pytest.raises(ConfigError, match="self-generated calibration"):
            self_generated_ids(model, bad)


def test_sampling_runs_on_one_cpu_thread_and_restores_the_count(tiny_model):
    model = tiny_model("qwen2_moe")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        handle = model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        try:
            self_generated_ids(model, SelfText(tokens=8, length=4, batch=2))
        finally:
            handle.remove()
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
