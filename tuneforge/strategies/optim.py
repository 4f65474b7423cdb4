"""Optimizer parameter groups (learning-rate strategies) and the learning-rate schedule.

Each layer group gets its own learning rate:
  single           optim.lr everywhere
  differential     optim.group_lr maps group selectors to learning rates (the last match wins)
  layerwise_decay  optim.lr * layer_decay ** depth, depth counted from the top: the head and
                   neck 0, the last block 1, ..., the embeddings / stem n_blocks + 1
Biases and normalisation weights (1-D tensors) get no weight decay: decaying a LayerNorm
gain or a bias towards zero only fights the pretrained values.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from tuneforge.errors import RecipeError
from tuneforge.models.groups import LayerGroup
from tuneforge.strategies.freeze import FreezePlan, select_params
from tuneforge.strategies.schedules import PlateauState, make_multiplier


def group_lrs(groups: list[LayerGroup], optim_spec) -> dict[str, float]:
    """Learning rate of each layer group under the recipe's LR strategy."""
    strategy = optim_spec.lr_strategy
    if strategy == "single":
        return {g.name: optim_spec.lr for g in groups}
    if strategy == "layerwise_decay":
        blocks = [g.name for g in groups if g.name.startswith("block.")]

        def depth(name: str) -> int:
            if name in ("head", "neck"):
                return 0
            if name in blocks:
                return len(blocks) - blocks.index(name)
            return len(blocks) + 1

        return {g.name: optim_spec.lr * optim_spec.layer_decay ** depth(g.name) for g in groups}
    lrs: dict[str, float] = {}
    problems = []
    for selector, lr in optim_spec.group_lr.items():
        try:
            _, names = select_params([selector], groups)
        except ValueError as error:
            problems.append(f"optim.group_lr.{selector}: {error}")
            continue
        lrs.update({name: lr for name in names})
    if problems:
        raise RecipeError(problems)
    return lrs


def param_groups(model: nn.Module, groups: list[LayerGroup], optim_spec, trainable: set[str]) -> list[dict]:
    """One optimizer group per (layer group, decay or not), holding the parameters that ever train."""
    lrs = group_lrs(groups, optim_spec)
    uncovered = [g.name for g in groups if g.name not in lrs and any(p in trainable for p in g.params)]
    if uncovered:
        raise RecipeError([f"optim.group_lr gives no learning rate to group(s) {', '.join(uncovered)}, which train; "
                           f"add them (or a selector such as backbone / all); the groups are: "
                           f"{', '.join(g.name for g in groups)}"])
    params = dict(model.named_parameters())
    result = []
    for group in groups:
        names = [p for p in group.params if p in trainable]
        decay = [params[p] for p in names if params[p].ndim > 1]
        no_decay = [params[p] for p in names if params[p].ndim <= 1]
        for kind, members, weight_decay in (("decay", decay, optim_spec.weight_decay), ("no_decay", no_decay, 0.0)):
            if members:
                result.append({"params": members, "lr": lrs[group.name], "weight_decay": weight_decay,
                               "name": f"{group.name}/{kind}"})
    return result


def _staged(step: int, schedule, plan: FreezePlan) -> float:
    return schedule(step) * plan.lr_multiplier(step)


def build_optimizer(model: nn.Module, groups: list[LayerGroup], plan: FreezePlan, optim_spec, total_steps: int,
                    plateau: PlateauState | None = None):
    """AdamW over every parameter that trains in some stage; LR = group LR x schedule(step) x stage multiplier."""
    settings = {"betas": optim_spec.betas, "eps": optim_spec.eps}
    parameter_groups = param_groups(model, groups, optim_spec, plan.ever_trainable())
    try:  # the fused kernel updates all tensors in one pass: ~6x faster steps for MiniLM on CPU
        optimizer = torch.optim.AdamW(parameter_groups, fused=True, **settings)
    except (RuntimeError, ValueError):  # dtype/device the fused kernel does not support
        optimizer = torch.optim.AdamW(parameter_groups, **settings)
    schedule = make_multiplier(optim_spec.schedule, total_steps, plateau)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_staged, schedule=schedule, plan=plan))
    return optimizer, scheduler


class L2SP:
    """Penalty alpha/2 * sum |w - w_pretrained|^2 over the pretrained weights that train.

    It pulls fine-tuned weights towards where they started instead of towards zero,
    which keeps what pretraining learned (against catastrophic forgetting). Build it
    right after loading the pretrained weights, before any checkpoint is restored.
    """

    def __init__(self, model: nn.Module, alpha: float, names: set[str]):
        self.alpha = alpha
        self.pairs = [(param, param.detach().clone()) for name, param in model.named_parameters() if name in names]

    def __call__(self) -> torch.Tensor:
        terms = [((param - start) ** 2).sum() for param, start in self.pairs if param.requires_grad]
        if not terms:
            return torch.zeros(())
        return 0.5 * self.alpha * torch.stack(terms).sum()
