"""benchmarks/gpu_real_shape.py (issue 26's device run, scripts/device_issue26.sh) at a tiny shape: every step runs
and fills its section of the JSON, the compressed model decodes, the sparse full-shape checkpoint has the built
model's inventory, and the script calls only the driver's steps."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers.scripts import SCRIPTS, load_benchmark

bench = load_benchmark("gpu_real_shape")
TINY = ["--layers", "2", "--hidden", "64", "--experts", "8", "--intermediate", "256", "--shared", "256", "--heads",
        "4", "--vocab", "4096"]


@pytest.mark.slow
def test_every_step_fills_its_section_and_the_compressed_model_decodes(tmp_path, device):
    out = tmp_path / "gpu_real_shape.json"
    assert bench.main(["all", "--work", str(tmp_path / "work"), "--json", str(out), "--device", str(device), *TINY,
                       "--decode-tokens", "4", "--repeats", "1", "--batches", "1", "4", "--mobe-epochs-short", "2",
                       "--mobe-epochs", "6"]) == 0
    r = json.loads(out.read_text())
    assert set(bench.STEPS) | {"settings", "machine"} <= set(r)
    assert r["build"]["tokenizer"]["vocab"] <= r["build"]["tokenizer"]["model_vocab"] == 4096
    for run in ("short", "compress"):
        c = r[run]
        assert c["finished"] and c["in_flight"] is None and "--budget" in c["command"]
        assert {"calibrate", "gate/am", "up/am", "gate/varpro", "export"} <= set(c["phases"])
        assert all(p["seconds"] >= 0 and p["peak_gib"] > 0 for p in c["phases"].values())
        assert len(c["am_iter_seconds"]["gate"]) == c["counts"]["gate/am"]        # the listener saw every iteration
        assert c["extrapolated"]["layers"] == 24 and c["extrapolated"]["seconds"] > c["seconds"]
        assert c["summary"]["gate"]["params_ratio"] <= c["cut"]["budget"] + 1e-6
    assert r["short"]["counts"]["gate/am"] == 2 and r["short"]["default_counts"]["am"] == 30
    assert 0 < r["short"]["cut"]["budget"] < 1
    for family in ("gate", "up"):
        m = r["mobe"]["families"][family]
        assert m["r"] > 0 and m["seconds_per_epoch"] > 0
        assert m["params"] <= m["budget"] * 8 * 256 * 64 + 1                        # GloBE's parameters, one layer
    assert r["dryrun"]["full_shape"]["layers"] == 24
    assert set(r["dryrun"]["full_shape"]["families"]) == {"gate", "up"}
    decode = r["decode"]
    assert decode["compressed"]["generated_new_tokens"] == 4                    # the compressed model decoded
    for model in ("original", "compressed"):
        assert set(decode[model]["batches"]) == {"1", "4"}
        assert all(b["decode_tok_s"] > 0 for b in decode[model]["batches"].values())
    assert decode["compressed"]["batches"]["4"]["decode_batch"] == 4
    assert set(r["report"]) >= {"whole_model", "per_layer", "decode"}


def test_sparse_full_shape_checkpoint_reads_like_the_built_model(tmp_path):
    """The dry run's sparse checkpoint (no data written) has the inventory of the model that build saves."""
    from globe.io import open_checkpoint
    args = bench.parse_args(["build", "--work", str(tmp_path), "--json", str(tmp_path / "r.json"), *TINY,
                             "--device", "cpu"])
    bench.step_build(args, __import__("torch").device("cpu"))
    sparse = bench.write_sparse_checkpoint(args, tmp_path / "sparse", args.layers)
    with open_checkpoint(tmp_path / "model") as a, open_checkpoint(sparse) as b:
        built, planned = a.inventory(), b.inventory()
    assert (planned.total_params, planned.params, planned.p, planned.d, planned.num_experts) == \
        (built.total_params, built.params, built.p, built.d, built.num_experts)
    assert sum(f.stat().st_blocks for f in sparse.glob("*.safetensors")) * 512 < 1 << 20      # sparse: nothing written


def test_the_script_runs_only_the_drivers_steps_and_parses():
    script = SCRIPTS / "device_issue26.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    called = re.findall(r"^step (\w+)", script.read_text(), flags=re.M)
    assert called and set(called) == set(bench.STEPS)
