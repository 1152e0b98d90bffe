"""FitResults for runtime/export/eval tests: an exact factorisation of a model's experts, and quick real fits.

    exact_result(model)          # m = N atoms, atom i = W_i, r = p, A_i = I: reconstruct() == the experts exactly
    quick_fit(checkpoint_dir)    # globe.fit_model with tiny settings, cached per directory for the session
    shaped_result(dir, m, r, k)  # random factors of given shapes for every routed expert (bytes / speed tests)
    char_tokenizer(out_dir)      # a character-level fast tokenizer with < 64 ids (fits the tiny models' vocab)
    on_device(cfg, device)       # cfg with train.device = the `device` fixture (pytest --device)
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.core.result import FamilyFit, FitResult
from tests.helpers.tiny_models import reference_experts

QUICK = FitConfig(bank=BankConfig(m=4, r=4), sparsity=SparsityConfig(target_support=2),
                  train=TrainConfig(am_iters=3, varpro_steps=5))


def exact_result(model, families: tuple[str, ...] = ("gate", "up"), model_type: str | None = None) -> FitResult:
    """Every expert its own atom: bank [N, p, d] = the weights, codes = I [N, N], adapters = I [N, p, p]."""
    ref = reference_experts(model.state_dict())
    fams = {}
    for family in families:
        weights = ref[family].weights.float()
        n, p, _ = weights.shape
        fams[family] = FamilyFit(family=family, bank=weights.clone(), codes=torch.eye(n),
                                 adapters=torch.eye(p).expand(n, p, p).clone(), scales=torch.ones(n),
                                 ids=ref[family].ids)
    source = {"model_type": model_type or model.config.model_type}
    return FitResult(families=fams, config=FitConfig(), source=source)


def on_device(cfg: FitConfig, device: torch.device | str) -> FitConfig:
    """Set cfg.train.device (in place) and return cfg."""
    cfg.train.device = str(device)
    return cfg


@lru_cache(maxsize=None)
def _fit(path: str, families: tuple[str, ...]) -> FitResult:
    from globe.fit.engine import fit_model
    cfg = FitConfig.from_dict(QUICK.to_dict())
    cfg.bank.families = families
    return fit_model(path, cfg)


def quick_fit(path: str | Path, families: tuple[str, ...] = ("gate", "up")) -> FitResult:
    """A real (approximate) fit of a tiny checkpoint, computed once per directory and families."""
    return _fit(str(path), tuple(families))


def char_tokenizer(out_dir: str | Path, alphabet: str = " abcdefghijklmnopqrstuvwxyz.,\n") -> Path:
    """Save a character-level PreTrainedTokenizerFast to out_dir (ids < 64, [UNK]=0, [EOS]=2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2}
    vocab.update({ch: 3 + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[UNK]")
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


def shaped_result(model_dir, m: int, r: int, k: int, seed: int = 0) -> FitResult:
    """A FitResult with random factors of the given shapes for every routed expert (bytes do not depend on the
    fit's quality, so a fit is not needed to measure them)."""
    from globe.io import open_checkpoint
    with open_checkpoint(model_dir) as reader:
        inv = reader.inventory()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[layer, e] for layer in inv.moe_layers for e in range(inv.num_experts)])
    n, families = ids.shape[0], {}
    for family in ("gate", "up"):
        codes = torch.zeros(n, m)
        support = torch.rand(n, m, generator=gen).argsort(dim=1)[:, :k]
        codes.scatter_(1, support, torch.rand(n, k, generator=gen) + 0.1)
        families[family] = FamilyFit(family, torch.randn(m, r, inv.d, generator=gen) / inv.d ** 0.5, codes,
                                     torch.randn(n, inv.p, r, generator=gen) / r ** 0.5, torch.ones(n), ids)
    return FitResult(families, FitConfig(), source={"model_type": inv.model_type, "inventory": {"dtype": inv.dtype}})
