"""`globe compress MODEL_DIR -o OUT [--total-cut C | --budget F | --size GiB] [--calibration-text FILE] [--dense]
[--text FILE]`: the users' main job in one step: calibrate (on the given text, else on text the model samples
itself), fit the banks activation-aware with 4-bit factors at budget 0.6 (QUANT_DEFAULTS), 8-bit factors at a
parameter target given (PARAM_TARGET_BITS: --total-cut or --budget; --no-quant: unquantized), write the
compressed checkpoint (loadable with transformers' from_pretrained after
`import globe`) with a model card, optionally the dense checkpoint and an evaluation (perplexity, KL and top-1
agreement to the original). The run is globe.run.compress.run_compress; the fit options are those of `globe fit`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys

from globe.assets import DEFAULT_MODEL_DIR
from globe.cli import dry_run
from globe.cli.fit import SHARED_FIT_OPTIONS, add_fit_options, build_config
from globe.device import DEVICES
from globe.errors import ConfigError
from globe.fit.expert_config import COMPRESS_QUANT_STEPS, COMPRESS_STEPS
from globe.run.compress import (DEFAULT_CALIBRATION_MIX, DEFAULT_CALIBRATION_TOKENS, CompressRun, expert_default_off,
                                run_compress)
from globe.run.size_choice import candidate_config
from globe.run.fit import apply_total_cut, fit_summary, total_cut_of
from globe.tune import DistillConfig

FIT_OPTIONS = ("budget", *SHARED_FIT_OPTIONS)
# compress's defaults: 4-bit group-64 GPTQ factors at budget 0.6 (about 2.7 bits per routed weight, below 4-bit
# quantization of the experts; benchmarks/results/bytes.json, README "Bytes"); `globe fit` stays unquantized
QUANT_DEFAULTS = {"bits": 4, "budget": 0.6}
# a PARAMETER target (--total-cut / --budget given) stores 8-bit group-64 factors: at -25 % 4-bit noise was about
# the low-rank error itself (KL 1.8-2.3x bf16's), 8-bit is within a few % of bf16 at half its bytes
# (benchmarks/results/param_target_bits.json, embedded model); --size (a bytes target) chooses its own bits
PARAM_TARGET_BITS = 8
log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="fit + compressed export (+ dense export, evaluation) + model card, in one step",
                       description="Compress a checkpoint's routed experts in one step: fit, compressed export with "
                                   "a model card (README.md), optionally a dense export and an evaluation.")
    p.add_argument("model_dir", nargs="?", default=str(DEFAULT_MODEL_DIR), metavar="MODEL_DIR",
                   help="checkpoint directory or hub id (default: the embedded tiny model)")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output directory: the compressed checkpoint")
    cut = p.add_mutually_exclusive_group()
    cut.add_argument("--total-cut", type=float, metavar="C",
                     help="cut of the model's TOTAL parameters in (0, 1), e.g. 0.25; a parameter target: the "
                          f"factors are stored at --bits {PARAM_TARGET_BITS} unless --bits / --no-quant is given "
                          f"(default: --budget {QUANT_DEFAULTS['budget']} at --bits {QUANT_DEFAULTS['bits']})")
    cut.add_argument("--budget", type=float, metavar="F",
                     help=f"stored / dense params per family; given, a parameter target: --bits "
                          f"{PARAM_TARGET_BITS} factors unless --bits / --no-quant is given (default "
                          f"{QUANT_DEFAULTS['budget']} at --bits {QUANT_DEFAULTS['bits']}, 0.5 with --no-quant)")
    cut.add_argument("--size", type=float, metavar="GiB",
                     help="bytes of the whole checkpoint's tensors, in GiB (2**30 bytes): the budget (and, without "
                          "--bits / --no-quant, the bits and the kind: factors only, a small GloBE part + quantized "
                          "residuals, or plain quantization of the experts) are chosen so that the checkpoint fits")
    p.add_argument("--no-quant", action="store_true",
                   help=f"store the factors unquantized, in the model's dtype (default: --bits "
                        f"{QUANT_DEFAULTS['bits']}, --bits {PARAM_TARGET_BITS} with --total-cut / --budget, chosen "
                        "by --size; unquantized with --rank-allocation sensitivity)")
    cal = p.add_mutually_exclusive_group()
    cal.add_argument("--calibration-text", metavar="FILE",
                     help="text to collect activation statistics on (default: text the model samples itself, seeded "
                          "with --seed); the fit minimises the activation-weighted error")
    cal.add_argument("--no-calibration", action="store_true",
                     help="fit in weight space: no calibration, the plain Frobenius error of the weights")
    p.add_argument("--activation-steps", type=int,
                   help="L-BFGS evaluations of the activation-aware refinement of a calibrated fit (default 100)")
    p.add_argument("--calibration-tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS, metavar="N",
                   help=f"tokens to calibrate on: the first N of --calibration-text, or N sampled from the model "
                        f"(default {DEFAULT_CALIBRATION_TOKENS})")
    p.add_argument("--calibration-mix", type=float, metavar="X",
                   help="with --calibration-text: also calibrate on X times --calibration-tokens tokens the model "
                        "samples itself (the sample a run without text takes), statistics summed over both, which "
                        "covers the experts more evenly than a text alone; 0 = the text alone "
                        f"(default {DEFAULT_CALIBRATION_MIX:g})")
    p.add_argument("--distill-steps", type=int, default=DistillConfig().steps, metavar="N",
                   help="after the fit, distill the compressed parameters (banks, code values, adapters; nothing "
                        "else) to the original's next-token distribution on the calibration tokens for N Adam "
                        f"steps, kept only if that lowers the KL on held-out calibration sequences; 0 = off "
                        f"(default {DistillConfig().steps})")
    p.add_argument("--distill-lr", type=float, default=DistillConfig().lr, metavar="LR",
                   help=f"distillation step size, relative to each factor's RMS (default {DistillConfig().lr:g})")
    p.add_argument("--expert-steps", type=int, metavar="N",
                   help="after gate and up are fitted, refine both together for N Adam steps on the whole expert's "
                        "output down(act(gate x) * up x) on tokens routed to it at calibration (before quantization); "
                        f"0 = off (default {COMPRESS_STEPS} where it applies: a calibrated fit of gate and up, "
                        "without --residual-bits)")
    p.add_argument("--quant-steps", type=int, metavar="N",
                   help="with quantized factors, after the quantize stage: train what stays floating point (the "
                        "group scales and zeros of bank and adapters, the sparse code values; the integer codes "
                        "fixed) for N Adam steps on the same whole-expert output, kept only if that lowers its "
                        f"held-out error; runs after the expert phase; 0 = off (default {COMPRESS_QUANT_STEPS} where it "
                        "applies: the expert phase on, the factors quantized)")
    p.add_argument("--sensitivity", choices=("on", "off"),
                   help="on: after calibration, measure how much the model's output feels an error in each layer's "
                        "gate and up (one perturbed forward pass per layer and family) and weight the fit's "
                        "objectives by it, so the shared banks serve the layers the model feels; off: every layer "
                        "alike (default: on with --total-cut / --budget, off otherwise)")
    p.add_argument("--dense", action="store_true", help="also write the dense-reconstructed checkpoint")
    p.add_argument("--dense-out", metavar="DIR", help="where the dense checkpoint goes (default OUT-dense)")
    p.add_argument("--text", metavar="FILE", help="evaluate the original and the compressed model on this text: "
                                                  "perplexity, and KL and top-1 agreement of the compressed one")
    p.add_argument("--eval-tokens", type=int, default=0, metavar="N",
                   help="score only the first N tokens of --text (default 0: all of it)")
    add_fit_options(p)
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="compute device; auto = cuda, else mps, else cpu (default auto)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT, replacing its files")
    p.add_argument("--metrics", metavar="FILE", help="JSONL file receiving every metric of the fit "
                                                    "(default OUT/metrics.jsonl, next to the model files)")
    dry_run.add_argument(p)
    p.set_defaults(func=run)


def sensitivity_default(args: argparse.Namespace) -> bool:
    """--sensitivity's default: on at a parameter target (--total-cut / --budget; embedded model KL 0.98 / 0.91 /
    0.91x off's at -25 / -35 / -40 %), off without one (the 4-bit budget-0.6 main job: 1.04x off's; --size
    unmeasured) (benchmarks/results/sensitivity.json, README "The budget where the model feels it")."""
    return args.total_cut is not None or args.budget is not None


def _fit_args(args: argparse.Namespace) -> argparse.Namespace:
    """The `globe fit` namespace these options stand for (the rest at fit's defaults)."""
    fit = argparse.Namespace(config=None, checkpoint_every=None, calibration=None,
                             activation_steps=args.activation_steps, per_layer=False, routing_weights=False,
                             device=args.device)
    for name in FIT_OPTIONS:
        setattr(fit, name, getattr(args, name))
    if args.no_quant and args.bits is not None:
        raise ConfigError("give --bits or --no-quant, not both")
    if not args.no_quant and args.bits is None and args.size is None and args.rank_allocation != "sensitivity":
        target = args.budget is not None or args.total_cut is not None          # a parameter target: 8-bit
        fit.bits = PARAM_TARGET_BITS if target else QUANT_DEFAULTS["bits"]  # (a rank per layer: not quantized yet)
        if not target and args.m is None and args.r is None:
            fit.budget = QUANT_DEFAULTS["budget"]
    return fit


def _quant_steps(args: argparse.Namespace, cfg, quantized: bool) -> int:
    """--quant-steps: COMPRESS_QUANT_STEPS by default where the quantized expert phase applies (after the expert
    phase, on quantized factors), else 0; an explicit N > 0 where it cannot run is refused in one line."""
    applies = cfg.expert.enabled and quantized
    if args.quant_steps is None:
        return COMPRESS_QUANT_STEPS if applies else 0
    if args.quant_steps > 0 and not applies:
        why = ("the whole-expert phase is off (--expert-steps 0, or it does not apply here)" if not cfg.expert.enabled
               else "the factors are not quantized (--no-quant, or a rank per layer)")
        raise ConfigError(f"--quant-steps {args.quant_steps} trains quantized factors after the whole-expert phase, "
                          f"and {why}: drop --quant-steps")
    return args.quant_steps


def _config(args: argparse.Namespace):
    """The fit config of these options, with --size applied (returns (config, SizePlan or None))."""
    cfg, plans = _config_plans(args)
    return cfg, plans[0] if plans else None


def _calibration_mix(args: argparse.Namespace) -> float:
    """--calibration-mix as given, or its default; refused without --calibration-text (it would do nothing)."""
    if args.calibration_mix is None:
        return DEFAULT_CALIBRATION_MIX
    if args.calibration_text is None:
        raise ConfigError("--calibration-mix applies only with --calibration-text (without a text the calibration "
                          "is the model's self-generated sample alone)")
    return args.calibration_mix


def _config_plans(args: argparse.Namespace):
    """(config set to SIZE_RULE's plan, [every kind that fits --size: SIZE_RULE's first] or []); a --calibration-mix
    without a text is refused here, before any work."""
    _calibration_mix(args)
    if args.sensitivity == "on" and args.no_calibration:
        raise ConfigError("--sensitivity on needs calibration (the probe measures the model on the calibration "
                          "tokens): drop --no-calibration or --sensitivity on")
    cfg = build_config(_fit_args(args))
    cfg.activation.sensitivity = sensitivity_default(args) if args.sensitivity is None else args.sensitivity == "on"
    cfg.expert.steps = args.expert_steps or 0
    plans = []
    if args.size is not None:
        from globe.fit.planning.bytes import size_plans
        plans = size_plans(cfg, args.model_dir, args.size, bits_given=args.bits is not None or args.no_quant)
        if args.quant_group is not None:     # the user's group stands (the plan's bound, at a finer one, still holds)
            plans = [dataclasses.replace(p, group=None) for p in plans]
    # the whole-expert phase: by default wherever it applies; with --size, for the candidates that can take it
    configs = [candidate_config(cfg, p, quiet=True) for p in plans] or [cfg]
    if args.expert_steps is None:
        offs = [expert_default_off(c, calibrate=not args.no_calibration) for c in configs]
        if any(off is None for off in offs):
            cfg.expert.steps = COMPRESS_STEPS
        else:
            log.info("whole-expert phase off (default of --expert-steps %d): %s", COMPRESS_STEPS, offs[0])
    elif cfg.expert.enabled and plans and all(candidate_config(cfg, p, quiet=True).expert_refusal()
                                              for p in plans):
        raise ConfigError(configs[0].expert_refusal())
    cfg.expert.quant_steps = _quant_steps(args, cfg, quantized=bool(plans) or cfg.quant.bits is not None)
    if plans:
        candidate_config(cfg, plans[0], quiet=True).validate()     # every check, at the first candidate
        from globe.fit.planning.bytes import apply_plan
        apply_plan(cfg, plans[0])                                    # the phase stays as asked: per candidate
        return cfg, plans
    return cfg.validate(), plans


def compress_run(args: argparse.Namespace, cfg, plans: list, command: str) -> CompressRun:
    """The CompressRun of parsed `globe compress` options and their config (_config_plans: cfg, plans), as the
    command runs it (benchmarks that run the command's default call this too)."""
    return CompressRun(model_dir=args.model_dir, out=args.out, config=cfg, total_cut=args.total_cut,
                       calibration_text=args.calibration_text, calibration_tokens=args.calibration_tokens,
                       calibrate=not args.no_calibration, calibration_mix=_calibration_mix(args),
                       dense=args.dense, dense_out=args.dense_out, text=args.text,
                       eval_tokens=args.eval_tokens or None, overwrite=args.overwrite, device=args.device,
                       command=command, metrics=args.metrics,
                       size=plans[0].to_dict() if plans else None, size_plans=[p.to_dict() for p in plans] or None,
                       distill=DistillConfig(steps=args.distill_steps, lr=args.distill_lr).check())


def run(args: argparse.Namespace) -> int:
    cfg, plans = _config_plans(args)
    plan = plans[0] if plans else None
    if plan is not None:
        print(size_line(plan))
        if len(plans) > 1 and not args.no_calibration:
            print("--size candidates, fitted and kept by KL on held-out calibration tokens: "
                  + "; ".join(p.describe() for p in plans))
    if args.dry_run:                                       # nothing written
        if args.total_cut is not None:
            apply_total_cut(cfg, args.model_dir, args.total_cut)
        return dry_run.print_plan(args, cfg)
    command = "globe " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))
    out = run_compress(compress_run(args, cfg, plans, command))
    result, cut = out["result"], total_cut_of(out["result"])
    print(calibration_line(result.source.get("calibration") or {}))
    if "choice" in (result.source.get("size") or {}):
        from globe.run.size_choice import choice_line
        print(choice_line(result.source["size"]["choice"]))
    if "distill" in result.source:
        print(distill_line(result.source["distill"]))
    for name, row in fit_summary(result).items():
        minimised = f" (activation-weighted, minimised: {row['act_rel_err']:.4f})" if "act_rel_err" in row else ""
        print(f"{name:6} m={row['m']} r={row['r']} params {row['params_ratio']:.3f} of dense, "
              f"rel_err {row['rel_err']:.4f} (weights){minimised}, median support {row['median_support']:.1f}")
    if cut is not None:
        print(f"total parameters cut by {100 * cut:.2f} %")
    print(bytes_line(result))
    for name, rep in (out["evaluation"] or {}).items():
        div = rep.get("divergence")
        behaviour = f", KL {div['kl']:.5f} nats/token, top-1 agreement {div['top1']:.4f}" if div else ""
        print(f"{name:10} perplexity {rep['perplexity']['perplexity']:.4f}{behaviour} over "
              f"{rep['perplexity']['tokens']:,} tokens, {rep['footprint']['model_bytes']:,} bytes held")
    print(f"compressed checkpoint written to {out['out']} (model card {out['card'].name}; load it with "
          f"AutoModelForCausalLM.from_pretrained after `import globe`)" +
          (f"; dense checkpoint in {out['dense']}" if out["dense"] else ""))
    return 0


def size_line(plan) -> str:
    return (f"--size {plan.target_bytes / 2**30:.6g} GiB ({plan.target_bytes:,} bytes): {plan.describe()} per "
            f"family, target support {plan.support}; at most {plan.predicted_bytes:,} bytes "
            f"({plan.bits_per_weight:.2f} bits per routed weight)")


def bytes_line(result) -> str:
    """The checkpoint's tensor bytes by the byte model (globe.fit.planning.bytes), against the source's."""
    from globe.fit.planning.bytes import result_bytes
    b = result_bytes(result)
    if b is None:
        return "bytes: unknown (the source checkpoint is not readable here)"
    routed = sum(f["dense"] for f in b["families"].values())
    stored = sum(f["stored"] for f in b["families"].values())
    return (f"bytes: {b['after']:,} of tensors ({b['after'] / 2**30:.4g} GiB), {b['after'] / b['before']:.3f} of the "
            f"original {b['before']:,}; compressed families {stored:,} of {routed:,} "
            f"({8 * stored / (routed / b['value_bytes']):.2f} bits per routed weight)")


def calibration_line(info: dict) -> str:
    """Where the calibration of a compress run came from, in one line."""
    kind = info.get("source", "none")
    if kind == "self-generated":
        return (f"calibrated on {info['tokens']:,} tokens the model generated itself (seed {info['seed']}, "
                f"temperature {info['temperature']:g})")
    if kind == "text":
        own = info.get("self_generated")
        return (f"calibrated on the first {info['tokens']:,} tokens of {info['text']}"
                + (f" and {own['tokens']:,} tokens the model generated itself (seed {own['seed']})" if own else ""))
    if kind == "statistics file":
        return f"calibrated with the statistics in {info['stats']}"
    return "not calibrated: weight-space fit"


def distill_line(info: dict) -> str:
    """What the distillation of a compress run did, in one line."""
    kl = f"KL on {info['validation_sequences']} held-out calibration sequences {info['validation_kl_before']:.6f} -> " \
         f"{info['validation_kl_after']:.6f}" if info.get("validation_kl_before") is not None else "no held-out KL"
    what = "kept" if info.get("accepted") else "rejected, the fit is kept as it was"
    return f"distilled {', '.join(info['trained'])} for {info['config']['steps']} steps ({kl}): {what}"
