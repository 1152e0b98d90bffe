"""benchmarks/peers.py end to end on the embedded model with short settings: every method at one cut, equal
stored params, scores from the reloaded dense checkpoints, one JSON."""
from __future__ import annotations

import json
import math

import pytest

from tests.helpers.scripts import load_benchmark

peers = load_benchmark("peers")
peers_table = load_benchmark("peers_table")


@pytest.fixture(autouse=True)
def _restore_log_levels():
    """peers.main quiets globe's loggers for its own output; later tests read those loggers' records."""
    import logging
    names = ("globe", "globe.fit", "globe.io", "globe.calibration", "globe.export", "globe.runtime", "benchmarks.peers")
    levels = {n: logging.getLogger(n).level for n in names}
    root = (logging.getLogger().level, list(logging.getLogger().handlers))
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
    logging.getLogger().setLevel(root[0])
    logging.getLogger().handlers[:] = root[1]


@pytest.fixture
def short_globe_fits(monkeypatch):
    """The GloBE fits of the end-to-end run made short as --globe-am-iters / --globe-varpro-steps make AM and
    VarPro short: the nonlinear fit's Adam steps (600 by default: half of this test's time), the activation-aware
    VarPro evaluations of the globe-default rows (100) and their whole-expert phase (200 steps) are cut too. What is
    checked of each row (present, within the budget, finite errors, KL and top-1) does not need long fits."""
    import globe
    import globe.cli.compress as compress_cli
    from globe.fit.config import FitConfig

    def cut(cfg: FitConfig) -> FitConfig:
        cfg.nonlinear.steps, cfg.activation.steps = min(cfg.nonlinear.steps, 50), min(cfg.activation.steps, 2)
        cfg.expert.steps = min(cfg.expert.steps, 4)     # compress's default whole-expert phase (200 steps)
        return cfg

    def short(*args, **kwargs) -> FitConfig:
        return cut(FitConfig(*args, **kwargs))
    monkeypatch.setattr(globe, "FitConfig", short)
    config = compress_cli._config                      # the globe-default rows: `globe compress`'s own config

    def short_compress(args):
        cfg, plan = config(args)
        return cut(cfg), plan
    monkeypatch.setattr(compress_cli, "_config", short_compress)


@pytest.mark.slow
def test_every_method_at_one_cut_writes_one_json(tmp_path, short_globe_fits):
    calib = tmp_path / "calib.txt"
    calib.write_text(("def f(x):\n    return x + 1  # a tiny calibration text\n" * 400), encoding="utf-8")
    out = tmp_path / "peers.json"
    report = peers.main(["--cuts", "0.25", "--calib", str(calib), "--calib-tokens", "1024", "--output-tokens", "256",
                         "--fisher-batches", "2", "--ppl-tokens", "512", "--mobe-epochs", "4", "--mobe-sweep", "m=E/8",
                         "--globe-am-iters", "1", "--globe-varpro-steps", "2", "--default-calib-tokens", "256",
                         "--stats-dir", str(tmp_path), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=float))
    cut = report["models"][0]["cuts"][0]
    rows = {r["method"]: r for r in cut["rows"]}
    assert set(rows) == set(peers.METHODS) - {"mobe-sweep"} | {"mobe-best"}
    for row in rows.values():
        for f in ("gate", "up"):
            assert row["params_ratio"][f] <= cut["budget_per_family"] + 1e-3, (row["method"], row["params_ratio"])
            assert 0 < row["rel_err"][f] < 1.5
        assert math.isfinite(row["perplexity"]) and 0 < row["output_rel_err"]["rel_err"]
        assert 0 < row["kl"] < 5 and 0 < row["top1"] <= 1, (row["method"], row["kl"], row["top1"])
    assert [s["config"]["m"] for s in cut["mobe_sweep"]] == [4, 2]
    best = min(cut["mobe_sweep"], key=lambda s: sum(e * e for e in s["rel_err"].values()))
    assert abs(rows["mobe-best"]["rel_err"]["gate"] - best["rel_err"]["gate"]) < 5e-3   # up to bf16 rounding
    globes = ("globe", "globe-nonlinear", "globe-aware", "globe-default", "globe-default-text", "globe-default-quant",
              "globe-default-bits4")
    assert set(cut["ratios"]) == {f"{g}/{m}" for g in globes for m in ("mobe", "mobe-best", "best-peer")}
    peer_rows = [r for r in rows.values() if not r["method"].startswith("globe")]
    best = min(peer_rows, key=lambda r: r["kl"])
    for g in globes:
        vs = cut["ratios"][f"{g}/best-peer"]
        assert vs["best_peer"] == best["method"] and vs["kl"] == pytest.approx(rows[g]["kl"] / best["kl"])
        assert vs["top1_not_above"] == [r["method"] for r in peer_rows if r["top1"] >= rows[g]["top1"]]
    assert rows["globe-default"]["shape"]["calibration"]["source"] == "self-generated"
    assert rows["globe-default-text"]["shape"]["calibration"]["source"] == "text"
    assert rows["globe-default-quant"]["shape"]["calibration"]["source"] == "self-generated"
    width = report["models"][0]["model"]["value_bytes"]
    for name in ("svd", "mobe", "reap"):                                # dense checkpoints: bytes per value x params
        assert rows[name]["bytes"] == {f: width * rows[name]["params"][f] for f in ("gate", "up")}
    quant, plain = rows["globe-default-bits4"], rows["globe-default"]        # --bits 4 (the default before)
    assert quant["shape"]["quant"]["gate"] == {"bank": "4-bit, groups of 64", "adapters": "4-bit, groups of 64"}
    assert plain["shape"]["quant"]["gate"] is None
    for f in ("gate", "up"):                 # equal params (the same cut), 4-bit factors: well under half the bytes
        assert abs(quant["params"][f] - plain["params"][f]) <= 0.02 * plain["params"][f]
        assert quant["bytes"][f] < 0.5 * plain["bytes"][f]
        assert plain["bytes"][f] > width * plain["params"][f]           # + the codes' indices, scales and ids
    assert quant["total_bytes"] < plain["total_bytes"] < report["models"][0]["model"]["bytes"]
    eight = rows["globe-default-quant"]               # the default at a parameter target: 8-bit factors
    assert eight["shape"]["quant"]["gate"] == {"bank": "8-bit, groups of 64", "adapters": "8-bit, groups of 64"}
    for f in ("gate", "up"):                          # equal params, between the 4-bit and the bf16 bytes
        assert abs(eight["params"][f] - plain["params"][f]) <= 0.02 * plain["params"][f]
        assert quant["bytes"][f] < eight["bytes"][f] < plain["bytes"][f]
    assert rows["globe-default-bits4"]["shape"]["calibration"]["source"] == "self-generated"
    assert rows["svd"]["rel_err"]["gate"] < rows["d2moe"]["rel_err"]["gate"]      # the base costs D2 rank here


def test_sweep_configs_resolve_fractions_of_the_experts():
    cfgs = peers.sweep_configs(["m=E/8", "m=E/2,act=tanh", "lr=0.02,epochs=9", "m=3"], 16, 50)
    assert [(c.m, c.act, c.lr, c.epochs) for c in cfgs] == [(None, "silu", 0.07, 50), (2, "silu", 0.07, 50),
                                                            (8, "tanh", 0.07, 50), (None, "silu", 0.02, 9)]


def test_table_puts_kl_first_with_top1_beside_it():
    row = {"method": "globe", "kl": 0.01234, "top1": 0.9321, "rel_err": {"gate": 0.3, "up": 0.31},
           "output_rel_err": {"rel_err": 0.05}, "perplexity": 50.0, "delta_ppl": 1.0, "fit_seconds": 12}
    old = {**row, "method": "svd"}
    del old["kl"], old["top1"]                                          # a file written before KL was measured
    model = {"model": {"dir": "m", "layers": 4, "experts": 8, "p": 16, "d": 32, "original_perplexity": 49.0,
                       "heldout_tokens": 1000},
             "cuts": [{"cut": 0.35, "budget_per_family": 0.4, "rows": [old, row],
                       "ratios": {"globe/mobe": {"kl": 0.5, "gate": 1.0, "up": 1.0, "output": 1.0, "delta_ppl": 0.9}}}]}
    lines = peers_table.model_table(model)
    header = next(line for line in lines if line.startswith("| cut (budget"))
    assert header.split("|")[3].strip().startswith("KL") and "top-1" in header.split("|")[4]
    assert "| globe | 0.01234 | 0.9321 |" in "\n".join(lines) and "| svd | - | - |" in "\n".join(lines)
    assert any(line.startswith("| -35 % | globe | 0.50 |") for line in lines)


def test_reap_and_hc_smoe_rows_spend_no_more_total_params_than_svd(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(("def f(x):\n    return x + 1  # a tiny calibration text\n" * 400), encoding="utf-8")
    report = peers.main(["--cuts", "0.35", "--methods", "svd", "reap", "hc-smoe", "--calib", str(calib),
                         "--calib-tokens", "1024", "--output-tokens", "256", "--ppl-tokens", "512",
                         "--stats-dir", str(tmp_path), "--out", str(tmp_path / "peers.json")])
    model = report["models"][0]
    cut = model["cuts"][0]
    rows = {r["method"]: r for r in cut["rows"]}
    layers, e, p, d = model["model"]["layers"], model["model"]["experts"], model["model"]["p"], model["model"]["d"]
    k = rows["reap"]["shape"]["gate"]["experts_kept"]
    assert rows["reap"]["total_params"] == model["model"]["total_params"] - layers * (e - k) * (3 * p * d + d)
    c = rows["hc-smoe"]["shape"]["gate"]["clusters"]
    assert rows["hc-smoe"]["total_params"] == model["model"]["total_params"] - layers * (e - c) * 3 * p * d
    one_expert = layers * (3 * p * d + d)                                 # the granularity of dropping experts
    for m in ("reap", "hc-smoe"):
        assert rows["svd"]["total_params"] - one_expert < rows[m]["total_params"] <= rows["svd"]["total_params"] \
            + 2 * layers * e * (p + d)                                    # svd rounds its rank down too
        assert rows[m]["params_ratio"]["gate"] <= cut["budget_per_family"] + 1e-9
        assert 0 < rows[m]["kl"] < 5 and 0 < rows[m]["top1"] <= 1
    assert len(rows["reap"]["shape"]["gate"]["kept"][0]) == k < e


def test_table_states_kl_against_the_best_peer_and_top1_misses():
    rows = [{"method": m, "kl": kl, "top1": t1, "rel_err": {"gate": 0.3, "up": 0.3}, "output_rel_err": {"rel_err": 0.1},
             "perplexity": 50.0, "delta_ppl": 0.5, "fit_seconds": 1}
            for m, kl, t1 in (("svd", 0.02, 0.90), ("mobe", 0.01, 0.95), ("globe-default", 0.004, 0.94))]
    cut = {"cut": 0.35, "budget_per_family": 0.4, "rows": rows, "ratios": peers.ratios(rows)}
    vs = cut["ratios"]["globe-default/best-peer"]
    assert vs["best_peer"] == "mobe" and vs["kl"] == pytest.approx(0.4) and vs["top1_not_above"] == ["mobe"]
    model = {"model": {"dir": "m", "layers": 4, "experts": 8, "p": 16, "d": 32, "original_perplexity": 49.0,
                       "heldout_tokens": 1000}, "cuts": [cut]}
    lines = peers_table.model_table(model)
    assert "| -35 % | globe-default | 0.40 | mobe (0.01000) | 0.9400 (0.9500) | mobe |" in lines


def test_summary_says_how_far_each_default_is_from_the_goal():
    rows = [{"method": m, "kl": kl, "top1": t1, "bytes": {"gate": b, "up": b}}
            for m, kl, t1, b in (("svd", 0.02, 0.90, 2_000_000), ("mobe", 0.01, 0.95, 2_000_000),
                                 ("globe-default-quant", 0.004, 0.96, 500_000), ("globe-default", 0.008, 0.94,
                                                                                 2_100_000))]
    report = {"models": [{"model": {"dir": "x/m"}, "cuts": [{"cut": 0.25, "rows": rows}]}]}
    lines = peers_table.summary_table(report)
    assert lines[2] == ("| m | -25 % | mobe: 0.01000 | 0.9500 | 4.000 | 0.00400 (0.40x, met) | 0.9600 | 1.000 | "
                        "0.00800 (0.80x, missed by 1.60x) | 0.9400 (not above every peer) | 4.200 |")
    assert peers_table.goal(0.5) == "met" and peers_table.goal(None) == "-"


def test_one_job_runs_cut_by_cut_over_every_model_and_saves_every_row(tmp_path, monkeypatch):
    """Every model is prepared first, then each cut over every model in the order given; the JSON on disk holds
    every finished row as soon as it is done (a run stopped early keeps them)."""
    out = tmp_path / "grid.json"
    calls, on_disk = [], []
    monkeypatch.setattr(peers, "prepare", lambda d, args: {"dir": d, "inv": None, "info": {"dir": str(d)}})
    monkeypatch.setattr("globe.fit.solvers.budget.total_cut_budget", lambda cut, inv, fam: (1 - cut, 4))

    def fake_row(method, ctx, budget, support):
        calls.append((ctx["dir"].name, ctx["cut"], method))
        saved = json.loads(out.read_text())["models"] if out.is_file() else []
        on_disk.append(sum(len(c["rows"]) for m in saved for c in m["cuts"]))
        return {"method": method, "kl": 0.01 if method == "svd" else 0.004, "top1": 0.9}

    monkeypatch.setattr(peers, "run_method", fake_row)
    monkeypatch.setattr(peers, "print_table", lambda report: None)
    report = peers.main(["a", "b", "--cuts", "0.35", "0.25", "--methods", "globe-default-quant", "svd",
                         "--out", str(out)])
    assert calls == [(m, c, k) for c in (0.35, 0.25) for m in "ab" for k in ("globe-default-quant", "svd")]
    assert on_disk == [0, 1, 2, 3, 4, 5, 6, 7]                          # every earlier row already written
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report, default=float))
    for model in saved["models"]:
        assert [c["cut"] for c in model["cuts"]] == [0.25, 0.35]       # sorted for the tables
        for cut in model["cuts"]:
            assert [r["method"] for r in cut["rows"]] == ["globe-default-quant", "svd"]
            assert cut["ratios"]["globe-default-quant/best-peer"]["kl"] == pytest.approx(0.4)


def test_passes_cover_every_cut_with_the_first_methods_before_the_next(tmp_path, monkeypatch):
    out = tmp_path / "grid.json"
    calls = []
    monkeypatch.setattr(peers, "prepare", lambda d, args: {"dir": d, "inv": None, "info": {"dir": str(d)}})
    monkeypatch.setattr("globe.fit.solvers.budget.total_cut_budget", lambda cut, inv, fam: (1 - cut, 4))
    monkeypatch.setattr(peers, "run_method", lambda method, ctx, budget, support:
                        calls.append((ctx["dir"].name, ctx["cut"], method)) or {"method": method, "kl": 0.01,
                                                                                "top1": 0.9})
    monkeypatch.setattr(peers, "print_table", lambda report: None)
    report = peers.main(["a", "b", "--cuts", "0.35", "0.25", "--passes", "globe-default-quant,svd", "reap",
                         "--out", str(out)])
    first = [(m, c, k) for c in (0.35, 0.25) for m in "ab" for k in ("globe-default-quant", "svd")]
    assert calls == first + [(m, c, "reap") for c in (0.35, 0.25) for m in "ab"]
    assert report["settings"]["methods"] == ["globe-default-quant", "svd", "reap"]
    for model in json.loads(out.read_text())["models"]:
        assert [c["cut"] for c in model["cuts"]] == [0.25, 0.35]                # one entry per cut, all passes in it
        for cut in model["cuts"]:
            assert [r["method"] for r in cut["rows"]] == ["globe-default-quant", "svd", "reap"]
            assert set(cut["ratios"]) == {"globe-default-quant/best-peer"}
    with pytest.raises(SystemExit, match="unknown methods"):
        peers.main(["a", "--passes", "svd,nope", "--out", str(out)])


def test_summary_of_two_files_takes_peers_from_one_and_globe_rows_from_the_other():
    def report(rows, ppl_tokens=8192):
        return {"settings": {"ppl_tokens": ppl_tokens}, "models": [{"model": {"dir": "x/m", "heldout_tokens": 100},
                                                                   "cuts": [{"cut": 0.25, "rows": rows}]}]}
    peer_rows = [{"method": "mobe", "kl": 0.01, "top1": 0.95}, {"method": "globe-default", "kl": 0.009, "top1": 0.93}]
    globe_rows = [{"method": "globe-default", "kl": 0.004, "top1": 0.97}, {"method": "svd", "kl": 0.001, "top1": 1.0}]
    merged = peers_table.merge(report(peer_rows), report(globe_rows))
    assert [r["method"] for r in merged["models"][0]["cuts"][0]["rows"]] == ["mobe", "globe-default"]
    lines = peers_table.summary_table(merged, rows=("globe-default",), sources=("grid.json", "globe.json"))
    assert lines[0].startswith("| model | cut | best peer (grid.json): KL |") and "globe-default (globe.json)" in lines[0]
    assert lines[2] == "| m | -25 % | mobe: 0.01000 | 0.9500 | - | 0.00400 (0.40x, met) | 0.9700 (+0.0200) | - |"
    with pytest.raises(SystemExit, match="ppl_tokens"):
        peers_table.merge(report(peer_rows), report(globe_rows, ppl_tokens=16384))


def test_per_model_tables_of_two_files_recompute_the_ratios_from_the_merged_rows():
    def row(method, kl, top1):
        return {"method": method, "kl": kl, "top1": top1, "rel_err": {"gate": 0.3, "up": 0.3},
                "output_rel_err": {"rel_err": 0.1}, "perplexity": 50.0, "delta_ppl": 0.5, "fit_seconds": 1}

    def report(rows):
        return {"settings": {}, "models": [{"model": {"dir": "x/m", "layers": 4, "experts": 8, "p": 16, "d": 32,
                                                      "original_perplexity": 49.0, "heldout_tokens": 1000},
                                            "cuts": [{"cut": 0.35, "budget_per_family": 0.4, "rows": rows,
                                                      "ratios": peers.ratios(rows)}]}]}
    first = report([row("mobe", 0.01, 0.95), row("globe-default", 0.009, 0.93)])       # the stale GloBE row
    rerun = report([row("globe-default", 0.002, 0.97)])
    merged = peers_table.merge(first, rerun)
    lines = peers_table.model_table(merged["models"][0])
    assert "| -35 % | globe-default | 0.20 | mobe (0.01000) | 0.9700 (0.9500) | none |" in lines
    assert any(line.startswith("| -35 % | globe-default | 0.20 | 1.000 | 1.000 |") for line in lines)  # / mobe
    assert not any("0.90" in line and line.startswith("| -35 % | globe-default |") for line in lines)


def test_a_later_rerun_of_one_globe_method_overrides_only_that_method():
    def report(rows):
        return {"settings": {}, "models": [{"model": {"dir": "x/m"}, "cuts": [{"cut": 0.25, "rows": rows}]}]}
    grid = report([{"method": "mobe", "kl": 0.01, "top1": 0.95}, {"method": "globe-default", "kl": 0.02, "top1": 0.9}])
    rerun = report([{"method": "globe-default", "kl": 0.004, "top1": 0.97},
                    {"method": "globe-default-quant", "kl": 0.008, "top1": 0.96}])
    quant = report([{"method": "globe-default-quant", "kl": 0.006, "top1": 0.965}])
    rows = {r["method"]: r["kl"] for r in peers_table.merge(grid, rerun, quant)["models"][0]["cuts"][0]["rows"]}
    assert rows == {"mobe": 0.01, "globe-default": 0.004, "globe-default-quant": 0.006}


def test_a_file_given_with_a_label_shows_its_globe_rows_under_that_label(tmp_path, capsys):
    def row(method, kl, top1):
        return {"method": method, "kl": kl, "top1": top1, "rel_err": {"gate": 0.3, "up": 0.3},
                "output_rel_err": {"rel_err": 0.1}, "perplexity": 50.0, "delta_ppl": 0.5, "fit_seconds": 1,
                "bytes": {"gate": 500_000, "up": 500_000}}

    def write(name, rows):
        doc = {"settings": {}, "models": [{"model": {"dir": "x/m", "layers": 4, "experts": 8, "p": 16, "d": 32,
                                                     "original_perplexity": 49.0, "heldout_tokens": 1000},
                                           "cuts": [{"cut": 0.25, "budget_per_family": 0.5, "rows": rows}]}]}
        (tmp_path / name).write_text(json.dumps(doc))
        return str(tmp_path / name)
    grid = write("grid.json", [row("mobe", 0.01, 0.95), row("globe-default", 0.02, 0.9)])
    old = write("old.json", [row("globe-default-quant", 0.008, 0.96)])               # the 4-bit run
    new = write("new.json", [row("globe-default-quant", 0.004, 0.97)])               # the rerun, same method name
    peers_table.main(["--summary", grid, "--globe-rows", f"{old}:globe-default-bits4", new])
    lines = capsys.readouterr().out.strip().splitlines()
    header = lines[0].split("|")
    assert [h.split(" (")[0].strip() for h in header if "KL (x best peer" in h] == \
        ["globe-default-quant", "globe-default-bits4", "globe-default"]
    assert "globe-default-quant (new.json): KL" in lines[0] and "globe-default-bits4 (old.json): KL" in lines[0]
    assert lines[2] == ("| m | -25 % | mobe: 0.01000 | 0.9500 | 1.000 | 0.00400 (0.40x, met) | 0.9700 (+0.0200) | "
                        "1.000 | 0.00800 (0.80x, missed by 1.60x) | 0.9600 (+0.0100) | 1.000 | - | - | - |")
    # (the first file's GloBE rows are stale: merge() takes them only from --globe-rows files)
    peers_table.main([grid, "--globe-rows", f"{old}:globe-default-bits4", new])      # per-model: both rows shown
    out = capsys.readouterr().out
    assert "| -25 % (0.500) | globe-default-bits4 | 0.00800 |" in out
    assert "| -25 % (0.500) | globe-default-quant | 0.00400 |" in out
    assert "| -25 % | globe-default-bits4 | 0.80 | mobe (0.01000) |" in out
    assert "| -25 % | globe-default-bits4 | 0.80 | 1.000 | 1.000 |" in out                  # its ratio to MoBE
    with pytest.raises(SystemExit, match="one GloBE method in the file, it has globe-default, globe-default-quant"):
        peers_table.main([grid, "--globe-rows", write("two.json", [row("globe-default", 0.01, 0.9),
                                                                   row("globe-default-quant", 0.01, 0.9)]) + ":globe-x"])
    with pytest.raises(SystemExit, match="must start with 'globe'"):
        peers_table.main([grid, "--globe-rows", f"{old}:bits4"])


@pytest.mark.parametrize("method, bits", [("globe-default-quant", 8), ("globe-default-bits4", 4),
                                          ("globe-default", None)])
def test_the_globe_default_rows_take_the_commands_own_config(tmp_path, method, bits):
    from globe.assets import DEFAULT_MODEL_DIR
    from globe.cli import compress as cli
    ctx = {"dir": DEFAULT_MODEL_DIR, "default_calib_tokens": 8192, "calib_path": tmp_path / "calib.txt",
           "globe_am_iters": None, "globe_varpro_steps": None}
    argv, args = peers.compress_args(method, ctx, 0.25, tmp_path)
    assert argv[argv.index("--total-cut") + 1] == "0.25"
    cfg, plan = cli._config(args)
    assert cfg.quant.bits == bits and plan is None          # globe-default-quant: the 8-bit parameter-target default
