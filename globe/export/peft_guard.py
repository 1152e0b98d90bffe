"""peft on a compressed model: `target_parameters` naming a GloBE-factored projection is refused in one line.

    peft.get_peft_model(model, LoraConfig(target_parameters=["gate_up_proj", "down_proj"]))
    -> ConfigError: peft target_parameters 'gate_up_proj' names a GloBE-factored projection ...

peft matches `target_parameters` against each module's own parameters and silently skips names it does not find;
on a GlobeExperts module the factored projections (`gate_up_proj`, ...) exist only as bank, code values and
adapters, so a LoRA meant for them would silently wrap the rest. Installed on `import globe` when peft is
imported (globe.export.hf_hook), it checks the names before peft injects anything.
"""
from __future__ import annotations

from torch import nn

from globe.errors import ConfigError
from globe.runtime.experts import GlobeExperts


def factored_names(module: GlobeExperts) -> set[str]:
    """Attribute names the original experts module used for the projections GloBE factored."""
    names = {f"{f}_proj" for f in module.factored}
    if {"gate", "up"} & set(module.factored):
        names.add("gate_up_proj")
    return names


def check_targets(model: nn.Module, targets: list[str] | set[str] | None) -> None:
    """ConfigError naming the first target that is a factored projection of a GlobeExperts module."""
    if not targets:
        return
    for name, module in model.named_modules():
        if not isinstance(module, GlobeExperts):
            continue
        factored = factored_names(module)
        for target in sorted(targets):
            if target.rpartition(".")[2] in factored:           # peft matches a target by its last component
                raise ConfigError(
                    f"peft target_parameters {target!r} names a GloBE-factored projection of {name or 'the model'} "
                    f"(stored as bank / code_values / adapters, all trainable parameters): train those directly, "
                    f"or name only untouched projections ({', '.join(sorted(module._parameters))})")


def install() -> None:
    """Wrap peft's parameter injection with check_targets (idempotent)."""
    from peft.tuners import tuners_utils
    inject = tuners_utils.BaseTuner._inject_parameters
    if getattr(inject, "_globe_guard", False):
        return

    def guarded(self, peft_config, model, *args, **kwargs):
        check_targets(model, getattr(peft_config, "target_parameters", None))
        return inject(self, peft_config, model, *args, **kwargs)

    guarded._globe_guard = True
    tuners_utils.BaseTuner._inject_parameters = guarded
