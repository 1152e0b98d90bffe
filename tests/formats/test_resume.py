"""globe.formats.resume: finished-family and progress files carry their format version; other versions are not
read (the store then refits), files of the earlier unversioned finished-family format still are."""
from __future__ import annotations

import logging

import pytest
import torch

from globe.fit.config import FitConfig
from globe.formats.resume import (FAMILY_VERSION, PROGRESS_VERSION, decode_family, decode_progress, encode_family,
                                  encode_progress, family_path, read_file, write_file)
from globe.run.resume_store import ResumeStore
from tests.helpers.fits import quick_fit


def test_a_finished_family_file_carries_its_version_and_a_newer_one_is_refitted(tiny_checkpoint, tmp_path, caplog):
    fam = quick_fit(tiny_checkpoint("qwen2_moe"), ("gate",)).families["gate"]
    store = ResumeStore(tmp_path, FitConfig(), "model")
    store.save_family(fam)
    path = family_path(store.dir, "gate")
    tensors, meta = read_file(path)
    assert meta["format_version"] == str(FAMILY_VERSION)
    assert torch.equal(decode_family("gate", tensors, meta).bank, fam.bank)
    old = {k: v for k, v in meta.items() if k != "format_version"}                # written before versions
    assert torch.equal(decode_family("gate", tensors, old).codes, fam.codes)
    write_file(path, tensors, {**meta, "format_version": str(FAMILY_VERSION + 1)})
    with caplog.at_level(logging.WARNING):
        assert store.finished("gate") is None
    assert "will be refitted" in caplog.text
    with pytest.raises(ValueError, match="finished-family format"):
        decode_family("gate", tensors, {**meta, "format_version": str(FAMILY_VERSION + 1)})


def test_progress_round_trip_and_other_versions():
    record = {"cursor": [1, 0, "am"], "varpro": [0.5], "err": 0.25, "gen_state": torch.arange(4, dtype=torch.uint8),
              "state": {"bank": torch.randn(3, 2, 4), "codes": torch.rand(5, 3), "best_bank": None, "best_codes": None,
                        "temperature": 0.1, "iteration": 7, "best_err": 0.3, "history": [{"err": 0.3}]},
              "best": {"bank": torch.randn(3, 2, 4), "codes": torch.rand(5, 3), "err": 0.2, "temperature": 0.2,
                       "history": {"am": []}}}
    tensors, meta = encode_progress(record)
    back = decode_progress(tensors, meta)
    assert back["cursor"] == record["cursor"] and back["state"]["iteration"] == 7 and back["best"]["err"] == 0.2
    assert torch.equal(back["state"]["bank"], record["state"]["bank"]) and back["state"]["best_bank"] is None
    assert torch.equal(back["gen_state"], record["gen_state"])
    meta = {"progress": meta["progress"].replace(f'"format": {PROGRESS_VERSION}', f'"format": {PROGRESS_VERSION + 1}')}
    with pytest.raises(ValueError, match="resume format"):
        decode_progress(tensors, meta)
