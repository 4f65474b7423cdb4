"""Discover a model's layer groups once, for every model family: stem, blocks, neck, head.

Blocks are the children of the outermost containers (ModuleList / Sequential)
that hold two or more composite modules of one type: BERT's encoder.layer,
ViT's encoder.layer, a ResNet's layer1..layer3. Parameters registered before the
first block form the embeddings (or stem); pretrained ones after the last block
form the neck (pooler, final norm); the newly attached layers are the head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table
from torch import nn


@dataclass
class LayerGroup:
    name: str
    modules: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # element count of each parameter in `params`
    count: int = 0


def _is_block_container(module: nn.Module) -> bool:
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
        return False
    children = list(module.children())
    first = type(children[0])
    composite = any(True for _ in children[0].children())
    has_params = any(True for _ in children[0].parameters())
    return composite and has_params and all(type(child) is first for child in children)


def find_blocks(model: nn.Module, head_prefixes: list[str] = ()) -> list[str]:
    """Module paths of the blocks, in registration (forward) order."""
    containers: list[str] = []
    for name, module in model.named_modules():
        if any(name == c or name.startswith(c + ".") for c in containers):
            continue
        if any(name == h or name.startswith(h + ".") for h in head_prefixes):
            continue
        if _is_block_container(module):
            containers.append(name)
    return [f"{c}.{child}" if c else child for c in containers for child, _ in model.get_submodule(c).named_children()]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_groups(model: nn.Module, head_prefixes: list[str]) -> list[LayerGroup]:
    blocks = find_blocks(model, head_prefixes)
    groups: dict[str, LayerGroup] = {}
    has_embedding = any(isinstance(m, nn.Embedding) for m in model.modules())
    front = "embeddings" if has_embedding else "stem"
    seen_block = False
    for name, param in model.named_parameters():
        if any(_within(name, h) for h in head_prefixes):
            group, module = "head", next(h for h in head_prefixes if _within(name, h))
        else:
            index = next((i for i, b in enumerate(blocks) if _within(name, b)), None)
            if index is not None:
                seen_block = True
                group, module = f"block.{index}", blocks[index]
            else:
                group, module = ("neck" if seen_block else front), name.rsplit(".", 1)[0]
        entry = groups.setdefault(group, LayerGroup(group))
        if module not in entry.modules:
            entry.modules.append(module)
        entry.params.append(name)
        entry.sizes.append(param.numel())
        entry.count += param.numel()
    order = [front] + [f"block.{i}" for i in range(len(blocks))] + ["neck", "head"]
    return [groups[name] for name in order if name in groups]


def render_groups(groups: list[LayerGroup], trainable: set[str] | None = None) -> Table:
    table = Table(title="layer groups (input → output)")
    table.add_column("group")
    table.add_column("modules")
    table.add_column("parameters", justify="right")
    if trainable is not None:
        table.add_column("trainable", justify="right")
    for group in groups:
        modules = ", ".join(group.modules[:3]) + (f" … (+{len(group.modules) - 3})" if len(group.modules) > 3 else "")
        row = [group.name, modules, f"{group.count:,}"]
        if trainable is not None:
            row.append("yes" if all(p in trainable for p in group.params) else "no")
        table.add_row(*row)
    total = sum(g.count for g in groups)
    table.add_row("total", "", f"{total:,}", *([""] if trainable is not None else []))
    return table


def frozen_prefix(groups: list[LayerGroup], frozen: set[str]) -> list[LayerGroup]:
    """The embeddings (or stem) and the leading blocks whose parameters are all in `frozen`.

    Empty unless at least one block is frozen behind the front: below that, caching the
    front's output saves too little to be worth it.
    """
    if not groups or groups[0].name not in ("embeddings", "stem") or not set(groups[0].params) <= frozen:
        return []
    blocks = []
    for group in groups[1:]:
        if not group.name.startswith("block.") or not set(group.params) <= frozen:
            break
        blocks.append(group)
    return [groups[0], *blocks] if blocks else []


def common_path(modules: list[str]) -> str:
    """The deepest module path that contains every one of `modules` ("" for the root)."""
    common = []
    for parts in zip(*(m.split(".") for m in modules)):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common)


def covering_modules(model: nn.Module, prefix: list[LayerGroup]) -> list[str] | None:
    """Whole modules that compute exactly the prefix groups, in forward order, or None.

    The front is one module when its parameters share a parent that holds no block
    (BERT's and ViT's `embeddings`); otherwise it is the run of sibling modules from
    the first one holding a front parameter up to the block container (a ResNet's
    conv1, bn1, and parameter-free ones such as a max-pool). The blocks follow.
    """
    if not prefix:
        return None
    front, blocks = prefix[0], [g.modules[0] for g in prefix[1:]]
    parent = common_path(front.modules)
    if parent and not any(_within(b, parent) for b in blocks):
        return [parent, *blocks]
    if parent in front.modules:
        return None  # a front parameter sits directly on the container of the blocks
    run, started = [], False
    container = model.get_submodule(parent)
    for name, _ in container.named_children():
        path = f"{parent}.{name}" if parent else name
        if any(_within(b, path) for b in blocks):
            break
        started = started or any(_within(m, path) for m in front.modules)
        if started:
            run.append(path)
    return [*run, *blocks] if run else None
