"""Freezing plans as data: a list of stages, each naming the layer groups that train.

Every strategy is a plan of one or more stages:
  full                everything trains
  partial             the last N blocks, the neck and the head train
  feature_extraction  the backbone is a fixed feature extractor (frozen and in eval mode,
                      so its features are deterministic); the neck (a pooler) and the head train
  head_only           only the newly added layers train
  bitfit              the backbone's biases and the whole head train (BitFit)
  progressive         the stages the recipe lists: each with a length, the groups that
                      train, and a learning-rate multiplier
With an adapter (recipe section `adapter`), a stage trains the adapter's parameters inside
the groups it names, not their pretrained weights; the head always trains whole.
Stage boundaries are optimizer steps, so the stage at any step is a pure function of
the step and a resumed run lands in the right stage by itself.

The embeddings (or stem) and leading blocks that stay frozen in every stage are the
plan's fixed prefix. It runs in eval mode (no dropout), so it is a fixed function of
the input: that is what lets the feature cache compute it once and reuse it every
epoch, and a run with the cache equals the same run without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from tuneforge.config.model import FreezeSpec, StageSpec
from tuneforge.errors import RecipeError
from tuneforge.models.groups import LayerGroup, covering_modules, frozen_prefix


@dataclass
class Stage:
    start_step: int
    selectors: list[str]
    lr_multiplier: float
    trainable: set[str] = field(default_factory=set)  # parameter names
    groups: list[str] = field(default_factory=list)  # group names that train (wholly or partly)


@dataclass
class FreezePlan:
    strategy: str
    stages: list[Stage]
    backbone_eval: bool  # feature_extraction: frozen backbone also runs in eval mode
    train_bn: bool
    head_prefixes: list[str]
    fixed: list[LayerGroup] = field(default_factory=list)  # the prefix frozen in every stage (see the module doc)

    def stage_index(self, step: int) -> int:
        return max(i for i, stage in enumerate(self.stages) if stage.start_step <= step)

    def lr_multiplier(self, step: int) -> float:
        return self.stages[self.stage_index(step)].lr_multiplier

    def ever_trainable(self) -> set[str]:
        return set().union(*(stage.trainable for stage in self.stages))

    def apply(self, model: nn.Module, index: int) -> None:
        """Set requires_grad for stage `index`."""
        trainable = self.stages[index].trainable
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)

    def train_mode(self, model: nn.Module, index: int) -> None:
        """model.train(), then eval mode for what must not change: frozen BatchNorm, a fixed feature extractor.

        `model` is the bare model (not a DistributedDataParallel wrapper), so names match the plan's.
        """
        model.train()
        trainable = self.stages[index].trainable
        for name, module in model.named_modules():
            params = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
            frozen = params and not any(p in trainable for p in params)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and frozen and not self.train_bn:
                module.eval()  # running statistics of frozen layers stay the pretrained ones
        for path in self.fixed_modules(model):
            model.get_submodule(path).eval()
        if self.backbone_eval:
            # The base model (bert, vit, a factory's net) runs as a fixed extractor: no dropout, fixed
            # statistics. Modules outside it (the head and the dropout in front of it) keep training.
            root = getattr(model, "base_model_prefix", "")
            for name, module in model.named_modules():
                inside = name == root or name.startswith(root + ".")
                if inside and not any(name == h or name.startswith(h + ".") for h in self.head_prefixes):
                    module.training = False  # this module only: eval() would recurse into the head

    def fixed_modules(self, model: nn.Module) -> list[str]:
        """Module paths of the fixed prefix: whole modules where they can be found, else those holding its parameters."""
        covering = covering_modules(model, self.fixed)
        if covering is not None:
            return covering
        return [m for group in self.fixed for m in group.modules]


def _resolve(selector: str, groups: list[LayerGroup]) -> list[LayerGroup]:
    blocks = [g for g in groups if g.name.startswith("block.")]
    names = [g.name for g in groups]
    if selector == "all":
        return groups
    if selector == "backbone":
        return [g for g in groups if g.name != "head"]
    if selector == "blocks":
        return blocks
    if selector.startswith("last:"):
        count = selector[5:]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"{selector!r}: last:N needs a whole number N >= 1")
        if int(count) > len(blocks):
            raise ValueError(f"{selector!r} asks for {count} blocks but the model has {len(blocks)} "
                             f"(block.0 … block.{len(blocks) - 1})")
        return blocks[len(blocks) - int(count):]
    if selector in names:
        return [g for g in groups if g.name == selector]
    raise ValueError(f"{selector!r} is not a layer group of this model; its groups are: {', '.join(names)}")


def select_params(selectors: list[str], groups: list[LayerGroup]) -> tuple[set[str], list[str]]:
    chosen: dict[str, LayerGroup] = {}
    for selector in selectors:
        for group in _resolve(selector, groups):
            chosen[group.name] = group
    return {p for g in chosen.values() for p in g.params}, [g.name for g in groups if g.name in chosen]


def _strategy_stages(spec: FreezeSpec, groups: list[LayerGroup]) -> list[tuple[StageSpec | None, list[str], float]]:
    if spec.strategy in ("full", "bitfit"):
        return [(None, ["all"], 1.0)]
    if spec.strategy == "partial":
        has_neck, has_head = (any(g.name == name for g in groups) for name in ("neck", "head"))
        # A text generator whose output layer is its (tied) input embedding has no head group of its own.
        return [(None, [f"last:{spec.trainable_blocks}", *(["neck"] if has_neck else []), *(["head"] if has_head else [])],
                 1.0)]
    if spec.strategy == "feature_extraction":  # the neck (e.g. BERT's pooler) is part of the feature head
        return [(None, [*(["neck"] if any(g.name == "neck" for g in groups) else []), "head"], 1.0)]
    if spec.strategy == "head_only":
        return [(None, ["head"], 1.0)]
    return [(stage, stage.train, stage.lr_multiplier) for stage in spec.stages]


def build_plan(spec: FreezeSpec, groups: list[LayerGroup], head_prefixes: list[str], updates_per_epoch: int,
               total_steps: int, adapter_params: set[str] | None = None) -> FreezePlan:
    """Resolve the recipe's plan against the model's actual groups; every problem is reported at once.

    `adapter_params`: the adapter's parameters, when there is one: outside the head, only they
    (and, for bitfit, biases) can train.
    """
    if spec.strategy == "auto":  # made concrete by training.advise before anything is built
        raise RecipeError(["model.freeze.strategy auto is chosen when `tuneforge train` starts (or shown by "
                           "`tuneforge advise`); give a strategy of your own for this command"])
    problems, stages, start = [], [], 0
    all_params = [p for g in groups for p in g.params]
    head = {p for g in groups if g.name == "head" for p in g.params}
    allowed = None  # outside the head, what may train (None: everything a stage selects)
    if adapter_params is not None or spec.strategy == "bitfit":
        allowed = set(adapter_params or ()) | ({p for p in all_params if p.endswith(".bias")}
                                                if spec.strategy == "bitfit" else set())
    if spec.strategy in ("head_only", "feature_extraction") and not any(g.name == "head" for g in groups):
        problems.append(f"model.freeze: strategy {spec.strategy} trains a new head, and this model has none (model.new_head "
                        "is false, or its output layer is tied to its input embeddings, as in T5, BART and GPT-2); use "
                        "strategy full or partial, or name groups explicitly with strategy progressive")
    for index, (stage_spec, selectors, multiplier) in enumerate(_strategy_stages(spec, groups)):
        where = f"model.freeze.stages.{index}" if stage_spec else "model.freeze"
        try:
            trainable, names = select_params(selectors, groups)
        except ValueError as error:
            problems.append(f"{where}.train: {error}")
            continue
        if allowed is not None:
            trainable = {p for p in trainable if p in head or p in allowed}
        trainable |= {p for p in all_params if any(re.search(rx, p) for rx in spec.include)}
        trainable -= {p for p in all_params if any(re.search(rx, p) for rx in spec.exclude)}
        if not trainable:
            problems.append(f"{where}: no parameter would train in this stage (check include/exclude"
                            + (", and that the adapter's target_modules lie in the groups that train)" if adapter_params
                               else ")"))
        stages.append(Stage(start, selectors, multiplier, trainable, names))
        if stage_spec is not None:
            start += stage_spec.steps or round(stage_spec.epochs * updates_per_epoch)
    if adapter_params and stages and not set(adapter_params) & set().union(*(stage.trainable for stage in stages)):
        where = sorted({g.name for g in groups for p in g.params if p in adapter_params})
        problems.append(f"model.freeze: the adapter sits in {', '.join(where)}, which no stage trains, so only the head "
                        "would learn; choose a strategy whose stages include those groups (e.g. full), or another "
                        "adapter.method")
    if spec.strategy == "progressive" and stages and stages[-1].start_step >= total_steps > 0:
        problems.append(f"model.freeze.stages: the stages start at steps {[s.start_step for s in stages]} but training "
                        f"has {total_steps} steps, so the last stage would never run; lengthen train.epochs or "
                        "shorten the stages")
    if problems:
        raise RecipeError(problems)
    plan = FreezePlan(spec.strategy, stages, spec.strategy == "feature_extraction", spec.train_bn, head_prefixes)
    if not spec.train_bn:  # BatchNorm statistics that keep moving would make the prefix a moving target
        plan.fixed = frozen_prefix(groups, set(all_params) - plan.ever_trainable())
    return plan


def describe_plan(plan: FreezePlan, groups: list[LayerGroup], updates_per_epoch: int) -> list[dict]:
    """Per stage: where it starts, which groups train, how many parameters train."""
    counts = {p: n for g in groups for p, n in zip(g.params, g.sizes)}
    rows = []
    for index, stage in enumerate(plan.stages):
        rows.append({"stage": index, "start_step": stage.start_step,
                     "start_epoch": round(stage.start_step / max(1, updates_per_epoch), 2),
                     "groups": stage.groups, "lr_multiplier": stage.lr_multiplier,
                     "trainable_parameters": sum(counts[p] for p in stage.trainable)})
    return rows
