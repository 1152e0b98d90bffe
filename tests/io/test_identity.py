"""globe.io.identity: the content hash of the routed experts follows the weights, not the layout or sharding."""
from __future__ import annotations

import os

import globe.io.identity as identity
from globe.io import open_checkpoint
from tests.helpers.tiny_models import make_tiny_checkpoint


def _hash(path) -> str:
    with open_checkpoint(path) as reader:
        return reader.content_hash()


def test_same_weights_same_hash_in_every_layout(tiny_checkpoint):
    hashes = {_hash(tiny_checkpoint("mixtral", layout=layout, shards=shards))
              for layout, shards in (("per_expert", 1), ("fused", 1), ("fused", 2), ("per_expert", 2))}
    assert len(hashes) == 1


def test_other_weights_other_hash(tiny_checkpoint, tmp_path):
    assert _hash(tiny_checkpoint("qwen2_moe")) != _hash(tiny_checkpoint("qwen2_moe", seed=1))
    other = make_tiny_checkpoint("qwen2_moe", tmp_path / "m", seed=0)
    before = _hash(other)
    data = bytearray((other / "model.safetensors").read_bytes())
    with open_checkpoint(other) as reader:                       # flip one byte inside one expert matrix
        block = reader.expert_blocks("up")[5]
    data[block.offset + 100] ^= 1
    (other / "model.safetensors").write_bytes(bytes(data))
    assert _hash(other) != before


def test_sampled_hash_of_large_checkpoints(tiny_checkpoint, monkeypatch):
    full = _hash(tiny_checkpoint("qwen2_moe"))
    monkeypatch.setattr(identity, "FULL_HASH_BYTES", 0)
    monkeypatch.setattr(identity, "CHUNK", 64)                  # tiny experts are 768 bytes: sample 4 x 64
    sampled = _hash(tiny_checkpoint("qwen2_moe"))
    assert sampled != full and sampled == _hash(tiny_checkpoint("qwen2_moe", layout="fused"))
    assert identity._pieces(0, 10_000, full=False) == [(0, 64), (3312, 64), (6624, 64), (9936, 64)]
    assert identity._pieces(0, 100, full=False) == [(0, 100)]
