"""globe.fit.planning.bytes: the byte model equals the bytes an artifact really writes, counted by hand from the
safetensors headers; --size picks a budget whose fit stays within the target (the real written bytes, to within
one quantization group's bytes), refuses impossible sizes stating the smallest reachable one, and refuses sizes
where plain quantization is better."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import globe
from globe.errors import ConfigError
from globe.export.card import tensor_bytes
from globe.fit.config import BankConfig, FitConfig, QuantSection, SparsityConfig, TrainConfig
from globe.fit.engine.quantize import stored_bytes
from globe.fit.planning.bytes import (GIB, PLAIN_QUANT_BITS, apply_size, family_bytes, quantized_bytes, result_bytes,
                                      source_bytes, value_bytes_of)
from globe.io import open_checkpoint
from globe.quant import QuantConfig, quantize

QUICK = TrainConfig(am_iters=2, varpro_steps=3)


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory) -> Path:
    """The small upcycled Qwen2-MoE of tests.helpers.scripts.small_upcycled (large enough that the routed experts dominate)."""
    from tests.helpers.scripts import small_upcycled
    return small_upcycled(tmp_path_factory.mktemp("size") / "ckpt")


def _family_written(art, family: str) -> int:
    return sum(n for k, n in tensor_bytes(art).items() if k.split(".")[0] == family)


@pytest.mark.parametrize("shape,bits,group", [((3, 5, 20), 3, 8), ((2, 7, 64), 4, 64), ((4, 9), 2, 4)])
def test_quantized_bytes_is_what_a_quantized_tensor_stores(shape, bits, group):
    qt = quantize(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), QuantConfig("rtn", bits, group))
    assert quantized_bytes(shape, bits, group) == qt.nbytes


@pytest.mark.parametrize("bits", [None, 4, 3])
def test_byte_model_equals_the_artifact_written_by_a_fit(tiny_checkpoint, tmp_path, bits):
    path = tiny_checkpoint("qwen2_moe", dtype=torch.bfloat16)
    cfg = FitConfig(bank=BankConfig(m=4, r=8), sparsity=SparsityConfig(target_support=2), train=QUICK,
                    quant=QuantSection(bits=bits, group=8))
    result = globe.fit_model(path, cfg)
    art = globe.save(result, tmp_path / "art")
    for name, fam in result.families.items():
        (n, p, d), nnz = fam.reconstruct().shape, int((fam.codes != 0).sum())
        model = family_bytes(n, p, d, 4, 8, nnz, value_bytes=2, bits=bits, group=8)
        assert model == stored_bytes(fam, 2)
        assert sum(model.values()) == _family_written(art, name) > 0
    counted = result_bytes(result)
    with open_checkpoint(path) as reader:
        other, dense = source_bytes(reader, ("gate", "up"))
    by_hand = sum(tensor_bytes(path).values())                       # every tensor of the source
    assert counted["before"] == by_hand == other + sum(dense.values())
    assert counted["after"] == other + sum(_family_written(art, f) for f in ("gate", "up"))


def test_size_target_is_met_by_the_written_bytes(upcycled, tmp_path):
    path = upcycled
    with open_checkpoint(path) as reader:
        other, dense = source_bytes(reader, ("gate", "up"))
    target = other + int(sum(dense.values()) * 2.5 / 16)           # 2.5 bits per routed gate/up weight
    cfg = FitConfig(train=QUICK, quant=QuantSection(group=8))
    plan = apply_size(cfg, path, target / GIB)
    assert plan.bits == 4 and cfg.quant.bits == 4 and 0 < cfg.bank.budget < 1
    assert plan.predicted_bytes <= target
    art = globe.save(globe.fit_model(path, cfg), tmp_path / "art")
    written = other + sum(_family_written(art, f) for f in ("gate", "up"))
    print(f"target {target:,}, planned at most {plan.predicted_bytes:,}, written {written:,}")
    group_bytes = math.ceil(8 * 4 / 8) + 4                           # one group of 8 entries at 4 bits + scale/zero
    assert written <= target + group_bytes
    assert written - other >= 0.8 * (target - other)                # the size is used, not wasted


def test_size_refuses_what_it_cannot_honour(upcycled):
    path = upcycled
    with open_checkpoint(path) as reader:
        other, dense = source_bytes(reader, ("gate", "up"))
    with pytest.raises(ConfigError, match=r"impossible: the smallest reachable checkpoint is [0-9.e-]+ GiB"):
        apply_size(FitConfig(), path, other / GIB)
    plain = other + int(sum(dense.values()) * PLAIN_QUANT_BITS / 16) + 64
    with pytest.raises(ConfigError, match="plain quantization.*benchmarks/results/bytes.json.*drop --bits"):
        apply_size(FitConfig(quant=QuantSection(bits=4)), path, plain / GIB, bits_given=True)
    with pytest.raises(ConfigError, match="drop --m"):
        apply_size(FitConfig(bank=BankConfig(m=4)), path, 0.001)
    with pytest.raises(ConfigError, match="positive"):
        apply_size(FitConfig(), path, 0.0)


def test_size_with_given_bits_keeps_them():
    from globe.fit.planning.bytes import solve_size
    n, p, d, width = 32, 16, 24, 2
    target = 10_000 + 2 * n * p * d * width * 3 // 16               # 3 bits per weight
    plan = solve_size(n, [(p, d), (p, d)], 10_000, target, width, FitConfig(quant=QuantSection(group=8)), 8,
                      fixed_bits=True)
    assert plan.bits == 8 and plan.predicted_bytes <= target
    assert value_bytes_of("bfloat16") == 2 and value_bytes_of("float32") == 4 and value_bytes_of("int8") == 4


def test_byte_model_counts_the_residuals_as_written(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen2_moe", dtype=torch.bfloat16)
    cfg = FitConfig(bank=BankConfig(m=4, r=8), sparsity=SparsityConfig(target_support=2), train=QUICK,
                    quant=QuantSection(bits=4, group=8, residual_bits=3, residual_group=32))
    result = globe.fit_model(path, cfg)
    art = globe.save(result, tmp_path / "art")
    for name, fam in result.families.items():
        n, p, d = fam.quant["residual"].shape
        nnz = int((fam.codes != 0).sum())
        model = family_bytes(n, p, d, 4, 8, nnz, value_bytes=2, bits=4, group=8, residual=(3, 32))
        assert model["residual"] == math.ceil(n * p * d * 3 / 8) + 4 * n * p * math.ceil(d / 32)   # by hand
        assert model == stored_bytes(fam, 2)
        assert sum(model.values()) == _family_written(art, name)


def test_size_picks_the_kind_by_the_rule_and_the_plain_family_meets_it(upcycled, tmp_path):
    """Below SIZE_RULE's threshold factors only, above it plain quantization (no refusal), a small GloBE part +
    residuals where asked for; every plan's written bytes stay within the target, to within one group's bytes."""
    from globe.fit.planning.bytes import SIZE_RULE
    with open_checkpoint(upcycled) as reader:
        other, dense = source_bytes(reader, ("gate", "up"))
    routed = sum(dense.values()) // 2                                 # bf16 weights of gate + up
    kinds = {}
    for bpw, kind in ((2.5, None), (3.9, "residual"), (4.5, None)):      # 4.5: exactly 4-bit group-64 GPTQ's
        cfg = FitConfig(train=QUICK, quant=QuantSection(group=8))
        target = other + int(routed * bpw / 8)
        plan = apply_size(cfg, upcycled, target / GIB, kind=kind)
        kinds[plan.kind] = (plan, cfg, target)
    assert set(kinds) == {"factors", "residual", "plain"}
    assert kinds["factors"][0].bits_per_weight < SIZE_RULE["plain_from_bits"] <= kinds["plain"][0].bits_per_weight
    plan, cfg, target = kinds["plain"]
    assert cfg.bank.budget == 0 and cfg.quant.residual_bits == plan.residual_bits == 4
    n, p, d = 16, 64, 128                                           # 2 layers x 8 experts
    packed = n * p * d * 4 // 8 + 4 * n * p * (d // 64)            # per-expert 4-bit group-64 codes, scales, zeros
    assert plan.residual_group == 64 and plan.predicted_bytes == target == other + 2 * packed   # no metadata
    plan, cfg, _ = kinds["residual"]
    assert 0 < cfg.bank.budget <= SIZE_RULE["residual_max_budget"] and cfg.quant.residual_bits == plan.residual_bits
    for kind in ("plain", "residual"):
        plan, cfg, target = kinds[kind]
        art = globe.save(globe.fit_model(upcycled, cfg), tmp_path / kind)
        written = other + sum(_family_written(art, f) for f in ("gate", "up"))
        if kind == "plain":           # the compressed checkpoint stores exactly the packed weights, as predicted
            from globe.export import save_compressed      # (the artifact adds 20 N + 8 bytes of bookkeeping)
            out = save_compressed(upcycled, globe.load(art), tmp_path / "plain_hf")
            stored = sum(b for k, b in tensor_bytes(out).items()
                         if any(f".{part}.{f}" in k for part in ("bank", "adapters", "code_values", "code_indices",
                                                                 "residual") for f in ("gate", "up")))
            assert written == target + 2 * (20 * n + 8)
            written = other + stored
            assert written == plan.predicted_bytes == target
        assert written <= target + math.ceil(8 * 4 / 8) + 4, kind
        assert written - other >= 0.8 * (target - other), kind



def test_capped_factors_spend_the_size_on_a_finer_group(upcycled, tmp_path):
    """Where 4-bit factors reach the largest budget with bytes left (64-row experts), --size halves their group
    while they fit: the written bytes stay within the target, use more of it, and the weighted error is lower than
    at the configured group."""
    from globe.fit.planning.bytes import MAX_SIZE_BUDGET
    with open_checkpoint(upcycled) as reader:
        other, dense = source_bytes(reader, ("gate", "up"))
    target = other + int(sum(dense.values()) * 5.0 / 16)           # 5 bits: group-64 factors cap at 4.4
    cfg = FitConfig(train=QUICK)                                    # group 64
    plan = apply_size(cfg, upcycled, target / GIB, kind="factors")
    assert plan.kind == "factors" and plan.bits == 4 and plan.budget == pytest.approx(MAX_SIZE_BUDGET, rel=1e-6)
    assert plan.group in (16, 32) and cfg.quant.group == plan.group and plan.predicted_bytes <= target
    assert f"group {plan.group}" in plan.describe()
    coarse = FitConfig(train=QUICK)
    coarse_plan = apply_size(coarse, upcycled, (other + int(sum(dense.values()) * 2.5 / 16)) / GIB, kind="factors")
    assert coarse_plan.group is None and coarse.quant.group == 64     # no room: the configured group
    coarse.bank.budget = cfg.bank.budget                              # the same budget at group 64
    fine, rough = globe.fit_model(upcycled, cfg), globe.fit_model(upcycled, coarse)
    art = globe.save(fine, tmp_path / "fine")
    written = other + sum(_family_written(art, f) for f in ("gate", "up"))
    assert rough.families["gate"].metrics["quant"]["bytes_total"] < fine.families["gate"].metrics["quant"]["bytes_total"]
    assert written <= target
    for f in ("gate", "up"):
        assert fine.families[f].metrics["rel_err"] < rough.families[f].metrics["rel_err"], f


def test_a_group_the_user_gives_stands_under_size(upcycled):
    """`globe compress --size` halves the factors' group only where the user gave none (--quant-group stands)."""
    from globe.cli.compress import _config_plans
    from globe.cli.main import build_parser
    with open_checkpoint(upcycled) as reader:
        other, dense = source_bytes(reader, ("gate", "up"))
    size = f"{(other + int(sum(dense.values()) * 5.0 / 16)) / GIB!r}"     # 5 bits: group-64 factors are capped
    base = ["compress", str(upcycled), "-o", "unused", "--size", size, "--no-calibration"]
    factors = lambda plans: next(p for p in plans if p.kind == "factors")              # noqa: E731
    _, plans = _config_plans(build_parser().parse_args(base))
    assert factors(plans).group in (16, 32)
    _, plans = _config_plans(build_parser().parse_args([*base, "--quant-group", "64"]))
    assert factors(plans).group is None


def test_a_rank_past_a_group_edge_no_longer_stops_the_size_short():
    """Experts whose factors reach a quantization group's edge (mixtral-e8-top2's 256 x 160 experts, 4-bit group-64
    adapters: r = 72 costs a second column of scales) at 2.5 bits: the plan pins the rank below the edge at the budget
    where its largest shape is reached (the bisection alone left 4.7 % of the limit unused); that shape is what the
    fit's solver takes at bank.r = the rank, and it stays within the limit."""
    from globe.fit.planning.bytes import family_shape_bytes, solve_size
    from globe.fit.solvers.budget import choose_shape
    n, p, d, width = 48, 256, 160, 2
    target = 1_000 + int(2 * n * p * d * 2.5 / 8)
    plan = solve_size(n, [(p, d), (p, d)], 1_000, target, width, FitConfig())
    assert plan.kind == "factors" and plan.bits == 4 and plan.rank == 64 and "rank 64" in plan.describe()
    assert plan.predicted_bytes <= target
    assert plan.predicted_bytes - 1_000 >= 0.96 * 2 * plan.family_limit
    svals = torch.rand(n, min(p, d), generator=torch.Generator().manual_seed(0)).sort(-1, descending=True).values
    m, r = choose_shape(n, p, d, plan.budget, plan.support, svals, rank=plan.rank)
    assert r == 64 and family_shape_bytes(n, p, d, m, r, width, 4, 64) <= plan.family_limit
    cfg = FitConfig()
    from globe.fit.planning.bytes import apply_plan
    assert apply_plan(cfg, plan).bank.r == 64 and apply_plan(cfg, replace(plan, rank=None)).bank.r is None


def test_the_embedded_model_meets_a_2_5_bit_size_and_uses_it(tmp_path):
    """The embedded model at 2.5 bits per routed gate/up weight: the written checkpoint is within the size (to one
    quantization group's bytes) and its factors take at least 96.5 % of the bytes the size leaves them."""
    from globe.assets import DEFAULT_MODEL_DIR
    with open_checkpoint(DEFAULT_MODEL_DIR) as reader:
        other, dense = source_bytes(reader, ("gate", "up"))
    target = other + int(sum(dense.values()) * 2.5 / 16)
    cfg = FitConfig(train=QUICK)
    plan = apply_size(cfg, DEFAULT_MODEL_DIR, target / GIB)
    assert plan.kind == "factors" and plan.predicted_bytes <= target
    art = globe.save(globe.fit_model(DEFAULT_MODEL_DIR, cfg), tmp_path / "art")
    written = other + sum(_family_written(art, f) for f in ("gate", "up"))
    print(f"target {target:,}, planned at most {plan.predicted_bytes:,}, written {written:,}")
    assert written <= target + math.ceil(64 * 4 / 8) + 4                # one group of 64 entries at 4 bits + scale/zero
    assert written - other >= 0.965 * (target - other)                 # 0.970 measured (0.995 planned)
