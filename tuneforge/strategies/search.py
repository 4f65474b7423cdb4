"""Search spaces as data: the default space a recipe is searched over, the values a trial draws, and the
recipe each trial trains.

A space maps recipe key paths to distributions (config/search.py). The recipe as written is always one
point of its space, the first trial, so a search never reports something worse than not searching.
"""

from __future__ import annotations

import copy
import json
import math
import typing

from pydantic import BaseModel

from tuneforge.config import Recipe
from tuneforge.config.search import ParamSpec, matches
from tuneforge.errors import RecipeError

# Settings that belong to one choice of another key: a trial that picks another choice drops them.
ORPHANS = {("model", "freeze", "stages"): ("model.freeze.strategy", "progressive"),
           ("model", "freeze", "trainable_blocks"): ("model.freeze.strategy", "partial"),
           ("model", "freeze", "head_hidden"): ("model.freeze.strategy", "feature_extraction"),
           ("optim", "group_lr"): ("optim.lr_strategy", "differential"),
           ("optim", "layer_decay"): ("optim.lr_strategy", "layerwise_decay")}
STRATEGIES = ["full", "partial", "head_only"]  # the freezing strategies a default search compares
SCHEDULES = ["linear", "cosine", "constant"]  # schedules that need no settings of their own


def default_space(recipe: Recipe, blocks: int, adds_head: bool) -> dict[str, ParamSpec]:
    """What `tune` searches when the recipe names no space: learning rate, schedule and warmup, freezing
    strategy and depth, layer-wise decay, weight decay, epochs, batch size and head dropout, each range built
    around the recipe's own value so that the recipe as written is inside it."""
    optim, train, freeze = recipe.optim, recipe.train, recipe.model.freeze
    space = {"optim.lr": ParamSpec(float=(max(optim.lr / 10, 1e-7), min(optim.lr * 10, 1.0)), log=True),
             "optim.weight_decay": ParamSpec(float=(0.0, max(0.1, optim.weight_decay))),
             "optim.schedule.name": ParamSpec(categorical=_with(SCHEDULES, optim.schedule.name))}
    if optim.schedule.warmup_steps is None:
        space["optim.schedule.warmup_ratio"] = ParamSpec(float=(0.0, max(0.2, optim.schedule.warmup_ratio)))
    if optim.lr_strategy in ("single", "layerwise_decay") and blocks > 1:
        space["optim.lr_strategy"] = ParamSpec(categorical=["single", "layerwise_decay"])
        space["optim.layer_decay"] = ParamSpec(float=(min(0.5, optim.layer_decay or 1.0), 1.0),
                                               when={"optim.lr_strategy": "layerwise_decay"})
    if adds_head and not recipe.adapter.enabled:
        space["model.freeze.strategy"] = ParamSpec(categorical=_with(STRATEGIES, freeze.strategy))
        if blocks > 1:
            space["model.freeze.trainable_blocks"] = ParamSpec(
                int=(1, max(blocks - 1, freeze.trainable_blocks or 1)), when={"model.freeze.strategy": "partial"})
        space["model.head_dropout"] = ParamSpec(float=(0.0, max(0.3, recipe.model.head_dropout)))
    if train.max_steps is None and train.epochs > 0:
        space["train.epochs"] = ParamSpec(int=(1, max(2 * train.epochs, 2)))
    if isinstance(train.batch_size, int):
        space["train.batch_size"] = ParamSpec(categorical=_with([16, 32, 64], train.batch_size))
    return space


def _with(choices: list, value) -> list:
    return choices if value in choices else [value, *choices]


_ABSENT = object()


def get_path(raw: dict, key: str, default=None):
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def set_path(raw: dict, key: str, value) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def search_order(space: dict[str, ParamSpec]) -> list[str]:
    """The keys in an order in which every condition's keys come first; RecipeError on a cycle."""
    order, placing = [], set()

    def place(key: str, chain: tuple) -> None:
        if key in order:
            return
        if key in placing:
            raise RecipeError([f"search.space: the conditions of {' -> '.join((*chain, key))} go round in a circle"])
        placing.add(key)
        for other in space[key].when:
            for searched in space:  # the key itself, or a searched section holding it
                if other == searched or other.startswith(searched + "."):
                    place(searched, (*chain, key))
        order.append(key)

    for key in space:
        place(key, ())
    return order


def is_active(param: ParamSpec, values: dict, base: dict, searched) -> bool:
    """Whether a key is searched, given the values drawn so far (a searched key that was not drawn has no
    value, so nothing that depends on it is searched) and the recipe for the keys that are not searched."""
    for other, wanted in param.when.items():
        holders = [k for k in searched if other == k or other.startswith(k + ".")]
        if any(k not in values for k in holders):
            return False
        current = values[other] if other in searched else \
            get_path(trial_recipe(base, {k: values[k] for k in holders}), other) if holders else get_path(base, other)
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if not any(matches(a, current) for a in allowed):
            return False
    return True


def draw(space: dict[str, ParamSpec], base: dict, suggest) -> dict:
    """The values of one trial: suggest(key, param) for each active key, conditions in order."""
    values: dict = {}
    for key in search_order(space):
        if is_active(space[key], values, base, space):
            values[key] = suggest(key, space[key])
    return values


def trial_recipe(base: dict, values: dict) -> dict:
    """The recipe (raw) a trial trains: the base with the drawn values (a section choice sets the keys it names,
    the rest of the section as the recipe has it), less the settings of choices not taken."""
    raw = copy.deepcopy(base)
    raw.pop("search", None)
    given = set()
    for key, value in values.items():
        current = get_path(raw, key)
        if isinstance(value, dict) and isinstance(current, dict) and is_section(key):
            _merge(current, copy.deepcopy(value), key)
            given |= {f"{key}.{leaf}" for leaf in _leaves(value)}
        else:
            set_path(raw, key, copy.deepcopy(value))
            given.add(key)
    for path, (key, choice) in ORPHANS.items():
        orphan = ".".join(path)
        if orphan not in given and any(key == k or key.startswith(k + ".") for k in values) \
                and get_path(raw, key) != choice:
            parent = get_path(raw, ".".join(path[:-1]))
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
    return raw


def is_section(key: str) -> bool:
    """Whether a recipe key is a section of settings (model.freeze, optim.schedule), which a choice sets key by
    key, rather than a mapping the user fills (optim.group_lr, model.factory_kwargs), which a choice replaces."""
    section = Recipe
    for part in key.split("."):
        field = section.model_fields.get(part) if isinstance(section, type) and issubclass(section, BaseModel) else None
        if field is None:
            return False
        models = [t for t in (field.annotation, *typing.get_args(field.annotation))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        if not models:
            return False
        section = models[0]
    return True


def _merge(into: dict, choice: dict, key: str) -> None:
    for name, value in choice.items():
        if isinstance(value, dict) and isinstance(into.get(name), dict) and is_section(f"{key}.{name}"):
            _merge(into[name], value, f"{key}.{name}")
        else:
            into[name] = value


def _leaves(section: dict, prefix: str = "") -> list[str]:
    return [leaf for key, value in section.items()
            for leaf in (_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])]


def recipe_point(space: dict[str, ParamSpec], base: dict) -> dict:
    """The recipe as written, as a point of the space (the values of the first trial)."""
    return draw(space, base, lambda key, param: get_path(base, key))


def space_problems(space: dict[str, ParamSpec], base: dict, validate) -> list[str]:
    """Everything wrong with a space, all at once: keys the recipe does not have, values the recipe refuses
    (each end of a range, each choice, tried on the recipe), and a recipe whose own value lies outside."""
    problems = []
    try:
        order = search_order(space)
    except RecipeError as error:
        return error.problems
    point = recipe_point(space, base)
    problems += _condition_problems(space, base)
    for key in order:
        param = space[key]
        if key in point and not param.holds(point[key]) and _has_path(base, key):
            problems.append(f"search.space.{key}: the recipe's own value {point[key]!r} is not {param.describe()}; "
                            "the first trial is the recipe as written, so widen the space or change the recipe")
        for value in _samples(param):
            # this value, and the keys it makes searched at their first value; the rest as the recipe has it
            trial = draw(space, base, lambda k, p, key=key, value=value: value if k == key else
                         point[k] if k in point else _samples(p)[0])
            changed = {k: v for k, v in trial.items() if k == key or k not in point}
            try:
                validate(trial_recipe(base, changed))
            except RecipeError as error:
                problems += [f"search.space.{key}: the value {value!r} gives a recipe that fails: {problem}"
                             for problem in error.problems[:2]]
                break
    return problems


def _condition_problems(space: dict[str, ParamSpec], base: dict) -> list[str]:
    """Conditions that can never hold: a key neither searched nor in the recipe, a value its key never takes."""
    problems = []
    for key, param in space.items():
        for other, wanted in param.when.items():
            allowed = wanted if isinstance(wanted, list) else [wanted]
            where = f"search.space.{key}.when.{other}"
            if other not in space and any(other.startswith(k + ".") for k in space):
                continue  # inside a searched section: its choices decide
            if other in space:
                never = [a for a in allowed if not space[other].holds(a)]
                if len(never) == len(allowed):
                    problems.append(f"{where}: {other} is searched as {space[other].describe()}, never "
                                    f"{' or '.join(map(repr, allowed))}, so {key} would never be searched")
            elif not _has_path(base, other):
                problems.append(f"{where}: the recipe has no key {other} (and it is not searched); check the spelling")
            elif not any(matches(a, get_path(base, other)) for a in allowed):
                problems.append(f"{where}: {other} is {get_path(base, other)!r} in the recipe and not searched, so "
                                f"{key} would never be searched")
    for (*parent, name), (governing, choice) in ORPHANS.items():
        orphan = ".".join((*parent, name))
        if orphan in space and governing in space and space[orphan].when.get(governing) not in (choice, [choice]):
            problems.append(f"search.space.{orphan}: it is for {governing} {choice} only, and {governing} is searched: "
                            f"add when: {{{governing}: {choice}}}")
    return problems


def _has_path(raw: dict, key: str) -> bool:
    return get_path(raw, key, _ABSENT) is not _ABSENT


def _samples(param: ParamSpec) -> list:
    if param.categorical is not None:
        return list(param.categorical)
    low, high = param.float_ or param.int_
    return [low, high]


def is_scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def choice_labels(param: ParamSpec) -> list:
    """Categorical choices as optuna stores them: scalars as they are, sections as JSON text."""
    return [c if is_scalar(c) else json.dumps(c, sort_keys=True) for c in param.categorical]


def suggest_with(trial):
    """suggest(key, param) that draws through an optuna trial."""
    def suggest(key: str, param: ParamSpec):
        if param.categorical is not None:
            labels = choice_labels(param)
            return param.categorical[labels.index(trial.suggest_categorical(key, labels))]
        if param.float_ is not None:
            return trial.suggest_float(key, *param.float_, log=param.log, step=param.step)
        step = int(param.step) if param.step else 1
        return trial.suggest_int(key, *param.int_, log=param.log, step=step)
    return suggest


def advised_point(space: dict[str, ParamSpec], base: dict, advised: dict) -> dict | None:
    """Advised values as a point of the space: each moved into its key's range (and onto its step), the keys the
    advice does not name as the recipe has them; None when the space does not offer an advised choice."""
    point = recipe_point(space, base)
    missing = object()

    def suggest(key: str, param: ParamSpec):
        if key not in advised:
            return point[key] if key in point else _samples(param)[0]
        value = advised[key]
        if param.categorical is not None:
            found = next((c for c in param.categorical if matches(c, value)), None)
            found = found if found is not None else _nearest(param.categorical, value)
            return missing if found is None else found
        low, high = param.float_ or param.int_
        value = min(max(value, low), high)
        if param.step:
            value = min(low + round((value - low) / param.step) * param.step, high)
        return int(round(value)) if param.int_ is not None else float(f"{value:.12g}")

    values = draw(space, base, suggest)
    return None if any(value is missing for value in values.values()) else values


def _nearest(choices: list, value):
    """The numeric choice nearest to a number (on a log scale where all are positive), or None."""
    numbers = [c for c in choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
    if not numbers or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if value > 0 and all(c > 0 for c in numbers):
        return min(numbers, key=lambda c: abs(math.log(c / value)))
    return min(numbers, key=lambda c: abs(c - value))


def same_point(a: dict, b: dict) -> bool:
    """Two points of a space are one: the same keys, numbers equal to rounding, sections and choices matching."""
    def same(x, y) -> bool:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y)):
            return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
        return matches(x, y) and matches(y, x)
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def enqueued_params(space: dict[str, ParamSpec], point: dict) -> dict:
    """The first trial's values as optuna parameters (categorical sections as their JSON text)."""
    params = {}
    for key, value in point.items():
        param = space[key]
        if param.categorical is not None:
            labels = choice_labels(param)
            params[key] = labels[next(i for i, c in enumerate(param.categorical) if matches(c, value))]
        else:
            params[key] = value
    return params
