"""Prompt tuning and prefix tuning: learned vectors added to a frozen model's sequence, attached in place.

peft offers both only through its PeftModel wrapper, which renames every parameter and feeds
the virtual tokens in its own forward; tuneforge keeps parameter paths as they are (layer groups,
freezing plans, layer-wise learning rates, the feature cache and exports depend on them), so the
vectors are attached here instead, as small modules inside the model:

  prompt  `SoftPrompt` inside the embeddings module (`bert.embeddings.tuneforge_prompt`): N vectors
          inserted into the embeddings' output right after its first position, so BERT's [CLS] and
          ViT's class token stay first and pooling is unchanged (prompt tuning; for ViT, shallow
          visual prompt tuning). The module that calls the embeddings gets N more ones in its
          attention mask. Needs an embeddings module whose output the blocks read (BERT, RoBERTa,
          DistilBERT, ViT, ...); GPT-2-style models, which add their embeddings inline, have none.
  prefix  `AttentionPrefix` inside every attention layer (`...attention.self.tuneforge_prefix`):
          N learned keys and values per head that every position attends to (prefix tuning). The
          model's attention implementation becomes `tuneforge_prefix`, transformers' scaled
          dot-product attention over [prefix; keys]. Needs a model whose attention goes through
          transformers' attention interface (BERT, RoBERTa, DistilBERT, ViT, GPT-2, ...); that is
          checked by running the model, and its outputs must not change before training.

Both are checked on example inputs when attached, and both sit where the freezing plan can see them:
the prompt in the embeddings group, each prefix in its block, so `strategy: partial` with a prefix
trains the last blocks' prefixes and caches the blocks before them. Neither can be merged into the
original architecture's weights: they export to ONNX and torch.export (the graph holds them), not
to a plain transformers folder.
"""

from __future__ import annotations

import inspect
from functools import partial

import torch
from torch import nn

from tuneforge.errors import ModelError, first_line
from tuneforge.models.groups import common_path

PREFIX_ATTENTION = "tuneforge_prefix"
PROMPT_MODULE = "tuneforge_prompt"
PREFIX_MODULE = "tuneforge_prefix"


class SoftPrompt(nn.Module):
    """`tokens` learned vectors of the embeddings' width."""

    def __init__(self, tokens: int, width: int, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(tokens, width) * std)


class AttentionPrefix(nn.Module):
    """`tokens` learned keys and values per attention head, prepended to the layer's own."""

    def __init__(self, heads: int, tokens: int, head_dim: int, key_std: float, value_std: float):
        super().__init__()
        self.key = nn.Parameter(torch.randn(heads, tokens, head_dim) * key_std)
        self.value = nn.Parameter(torch.randn(heads, tokens, head_dim) * value_std)


# ---------------------------------------------------------------- prompt tuning

def _insert_prompt(embeddings: nn.Module, args, output):
    """Forward hook on the embeddings: [first, prompt, rest]."""
    prompt = getattr(embeddings, PROMPT_MODULE).weight.to(output.dtype)
    return torch.cat([output[:, :1], prompt.expand(output.shape[0], -1, -1), output[:, 1:]], dim=1)


def _extend_mask(embeddings_path: str, owner: nn.Module, args, kwargs):
    """Forward pre-hook on the module that calls the embeddings and builds the attention mask from
    their output: the mask gains ones where the prompt is inserted."""
    bound = inspect.signature(owner.forward).bind_partial(*args, **kwargs)
    mask = bound.arguments.get("attention_mask")
    if mask is None:
        return None
    tokens = getattr(owner.get_submodule(embeddings_path), PROMPT_MODULE).weight.shape[0]
    bound.arguments["attention_mask"] = torch.cat(
        [mask[:, :1], mask.new_ones(mask.shape[0], tokens), mask[:, 1:]], dim=1)
    return bound.args, bound.kwargs


def attach_prompt(model: nn.Module, tokens: int, front_modules: list[str], example: dict) -> None:
    """`front_modules`: the modules of the model's embeddings (or stem) group; they must share one
    embeddings module (BERT's and ViT's `embeddings`)."""
    path = common_path(front_modules)
    if path.rpartition(".")[2] not in ("embeddings", "embedding"):
        raise ModelError(["adapter.prompt needs an embeddings module whose output the blocks read (BERT, RoBERTa, "
                          "DistilBERT, ViT, ...); this model adds its embeddings inside its forward. Use adapter.method "
                          "prefix or lora instead"])
    embeddings = model.get_submodule(path)
    owner_path = path.rpartition(".")[0]
    owner = model.get_submodule(owner_path) if owner_path else model
    with torch.no_grad():
        sample = _probe_embeddings(model, embeddings, example)
    embeddings.add_module(PROMPT_MODULE, SoftPrompt(tokens, sample.shape[-1], float(sample.std())))
    embeddings.register_forward_hook(_insert_prompt)
    owner.register_forward_pre_hook(partial(_extend_mask, path.removeprefix(owner_path).lstrip(".")), with_kwargs=True)
    try:
        with torch.no_grad():
            _run(model, example)
    except Exception as error:  # whatever this family's forward does with the longer sequence
        raise ModelError([f"adapter.prompt does not fit this model family ({type(model).__name__}): "
                          f"{first_line(error)}. Use adapter.method prefix or lora instead"]) from None


def _probe_embeddings(model: nn.Module, embeddings: nn.Module, example: dict) -> torch.Tensor:
    captured = []
    handle = embeddings.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        _run(model, example)
    finally:
        handle.remove()
    if not captured or not isinstance(captured[0], torch.Tensor) or captured[0].dim() != 3:
        raise ModelError([f"adapter.prompt: the embeddings of {type(model).__name__} do not give one (batch, sequence, "
                          "width) tensor; use adapter.method prefix or lora instead"])
    return captured[0]


def _run(model: nn.Module, example: dict):
    training = model.training
    model.eval()
    try:
        return model(**example).logits
    finally:
        model.train(training)


# ---------------------------------------------------------------- prefix tuning

_probing: list | None = None  # while attach_prefix probes the model: (module, key, value) of each attention call


def prefix_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers' scaled dot-product attention over the layer's prefix keys and values, then its own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _probing is not None:
        _probing.append((module, key, value))
    prefix = getattr(module, PREFIX_MODULE, None)
    if prefix is not None:
        batch, tokens, own = key.shape[0], prefix.key.shape[1], key.shape[2]
        key = torch.cat([prefix.key.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix.value.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
        if attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", False):
            # without a mask, sdpa would align the causal triangle to the prefix; spell it out instead
            length = query.shape[2]
            attention_mask = torch.ones(length, own, dtype=torch.bool, device=query.device).tril(own - length)[None, None]
        if attention_mask is not None:  # every position may attend to the prefix
            shape = (*attention_mask.shape[:-1], tokens)
            visible = (attention_mask.new_ones(shape) if attention_mask.dtype == torch.bool
                       else attention_mask.new_zeros(shape))
            attention_mask = torch.cat([visible, attention_mask], dim=-1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_prefix_attention() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(PREFIX_ATTENTION, prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PREFIX_ATTENTION, sdpa_mask)  # masks shaped as sdpa wants them


def _set_attention(model: nn.Module, implementation: str) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = implementation


def attach_prefix(model: nn.Module, tokens: int, example: dict) -> None:
    global _probing

    config = getattr(model, "config", None)
    original = getattr(config, "_attn_implementation", None)
    if original is None:
        raise ModelError([f"adapter.prefix needs a transformers model ({type(model).__name__} is not one); use adapter."
                          "method lora instead"])
    register_prefix_attention()
    with torch.no_grad():
        reference = _run(model, example)
        _set_attention(model, PREFIX_ATTENTION)
        _probing = []
        try:
            rerun = _run(model, example)
            calls = _probing
        except Exception as error:
            _set_attention(model, original)
            raise ModelError([f"adapter.prefix does not fit this model family ({type(model).__name__}): "
                              f"{first_line(error)}. Use adapter.method lora instead"]) from None
        finally:
            _probing = None
    difference = float((rerun - reference).abs().max())
    if not calls or difference > 1e-4:
        _set_attention(model, original)
        why = ("its attention does not go through transformers' attention interface" if not calls else
               f"its attention is not plain scaled dot-product attention (outputs moved by {difference:.1e})")
        raise ModelError([f"adapter.prefix does not fit this model family ({type(model).__name__}): {why}. "
                          "Use adapter.method lora instead"])
    for module, key, value in calls:
        if not hasattr(module, PREFIX_MODULE):
            module.add_module(PREFIX_MODULE, AttentionPrefix(key.shape[1], tokens, key.shape[3],
                                                             float(key.std()), float(value.std())))


def virtual_token_parameters(model: nn.Module) -> set[str]:
    """Names of the prompt's and the prefixes' parameters."""
    return {f"{path}.{name}" for path, module in model.named_modules() if isinstance(module, (SoftPrompt, AttentionPrefix))
            for name, _ in module.named_parameters()}
