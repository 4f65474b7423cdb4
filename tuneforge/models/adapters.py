"""Parameter-efficient fine-tuning: peft's LoRA, DoRA and IA3 adapters, injected into the model in place,
and prompt and prefix tuning (virtual tokens, see prompts.py).

In place (peft's `inject_adapter_in_model`) rather than wrapped in a PeftModel, so parameter
and module names keep their paths (`bert.encoder.layer.3.attention.self.query.lora_A.default.weight`
sits inside block 3): layer groups, freezing plans, layer-wise learning rates, the feature cache
and checkpoints all work unchanged. The adapter decides *which* parameters of a group can train
(its own); the freezing plan decides *which groups* train; the new head always trains whole.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from tuneforge.config.model import AdapterSpec
from tuneforge.errors import ModelError, first_line
from tuneforge.models.groups import layer_groups
from tuneforge.models.loading import example_inputs
from tuneforge.models.prompts import attach_prefix, attach_prompt, virtual_token_parameters

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def peft_config(spec: AdapterSpec, head_prefixes: list[str]):
    """The peft config for `spec`; the new head is excluded (it trains whole, not through an adapter)."""
    from peft import IA3Config, LoraConfig

    # A regex over full module paths: the head modules and everything inside them.
    exclude = "|".join(rf"{re.escape(prefix)}(\..*)?" for prefix in head_prefixes) or None
    if spec.method == "ia3":
        return IA3Config(target_modules=spec.target_modules, feedforward_modules=spec.feedforward_modules,
                         exclude_modules=exclude)
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules,
                      exclude_modules=exclude, use_dora=spec.method == "dora")


def attach_adapter(loaded, spec: AdapterSpec) -> None:
    """Attach the adapter to `loaded.model` (in place); raises ModelError when it does not fit the model."""
    from peft import inject_adapter_in_model

    model = loaded.model
    if spec.method in ("prompt", "prefix"):
        example = example_inputs(loaded, 2)
        if spec.method == "prefix":
            attach_prefix(model, spec.virtual_tokens, example)
        else:
            front = layer_groups(model, loaded.head_prefixes)[0]
            attach_prompt(model, spec.virtual_tokens, front.modules if front.name in ("embeddings", "stem") else [],
                          example)
        return
    try:
        inject_adapter_in_model(peft_config(spec, loaded.head_prefixes), model)
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError([f"adapter.{spec.method}: {first_line(error)}. Set adapter.target_modules to module names "
                          "of this model (`tuneforge inspect MODEL` lists its layers), or all-linear"]) from None


def adapter_parameters(model: nn.Module) -> set[str]:
    """Names of the adapter's own parameters (LoRA A/B, DoRA magnitudes, IA3 vectors, prompt and prefix
    vectors), not the layers they adapt."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = virtual_token_parameters(model)
    for path, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for attribute in module.adapter_layer_names:
                for name, _ in getattr(module, attribute).named_parameters():
                    names.add(f"{path}.{attribute}.{name}")
    return names


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every adapter merged into the weights it adapts and removed: a plain model
    with the original architecture, which transformers' from_pretrained loads without peft. Prompt and
    prefix vectors cannot merge and stay in the copy."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    for path, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            with torch.no_grad():
                module.merge()
            parent, _, child = path.rpartition(".")
            setattr(merged.get_submodule(parent) if parent else merged, child, module.get_base_layer())
    return merged


def apply_adapter(loaded, spec: AdapterSpec, model_spec, image_spec) -> None:
    """Attach the recipe's adapter to a loaded model and record how to rebuild it (LoadedModel.base)."""
    if not spec.enabled:
        return
    attach_adapter(loaded, spec)
    loaded.base = {"model": model_spec.model_dump(mode="json"), "image": image_spec.model_dump(mode="json"),
                   "adapter": spec.model_dump(mode="json")}


def adapter_scope(loaded) -> set[str] | None:
    """What a freezing plan may train outside the head: the adapter's parameters, or None without one."""
    return adapter_parameters(loaded.model) if loaded.base is not None else None
