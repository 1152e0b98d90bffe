"""`globe fit` under torchrun: 2 gloo processes write one artifact (rank 0) equal to the 1-process one."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import globe
from globe.cli.main import main
from globe.fit.parallel.comm import free_port

# --atoms/--adapter-rank: torchrun's parser would take --m/--r for abbreviations of its own options
ARGS = ["--atoms", "4", "--adapter-rank", "4", "--target-support", "2", "--am-iters", "3", "--varpro-steps", "5"]


def test_torchrun_fit_writes_the_one_process_artifact_from_rank_0(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen2_moe")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["fit", str(model), "-o", str(one), *ARGS]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "globe.cli.main", "fit", str(model), "-o", str(two), *ARGS, "--json"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)                      # one JSON document: only rank 0 reports
    ref, got = globe.load(one), globe.load(two)
    for name, fam in ref.families.items():
        other = got.families[name]
        assert summary[name]["m"] == fam.shape["m"] == other.shape["m"]
        assert float((other.bank - fam.bank).norm() / fam.bank.norm()) < 1e-4
        assert float((other.adapters - fam.adapters).norm() / fam.adapters.norm()) < 5e-4


def test_distributed_flag_outside_torchrun_is_refused(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["fit", str(tiny_checkpoint("qwen2_moe")), "-o", str(tmp_path / "o"), *ARGS, "--distributed"]) == 2
    assert "torchrun" in capsys.readouterr().err
