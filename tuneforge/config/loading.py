"""Reading a recipe: YAML without surprises, ${VAR} expansion, key.path=value overrides, and every problem
reported at once with its key path."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuneforge.config.recipe import Recipe
from tuneforge.errors import RecipeError
from tuneforge.tasks.registry import DEFAULT_TASK, find_task, get_task, task_names

_ENV_PATTERN = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def default_data_dir() -> str:
    """Where the shared datasets live: $TUNEFORGE_DATA, else ../shared/data beside the project."""
    if os.environ.get("TUNEFORGE_DATA"):
        return os.environ["TUNEFORGE_DATA"]
    candidates = [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[2] / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate)
    return str(candidates[0])


def _expand(value: Any, missing: list[str]) -> Any:
    """Expand ${VAR} and ${VAR:-default} inside strings; TUNEFORGE_DATA has a built-in default.

    As in the shell, an empty variable counts as unset. Unset variables without a
    default are collected in `missing` so they can be reported together.
    """
    if isinstance(value, dict):
        return {key: _expand(item, missing) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item, missing) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if os.environ.get(name):
            return os.environ[name]
        if default is not None:
            return default
        if name == "TUNEFORGE_DATA":
            return default_data_dir()
        missing.append(f"environment variable {name} is not set (used as ${{{name}}}); export it or write ${{{name}:-default}}")
        return match.group(0)

    return _ENV_PATTERN.sub(substitute, value)


MAX_RECIPE_SIZE = 2**20  # characters a recipe may hold once YAML's aliases are expanded


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' merges; its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one section (lines {seen[key]} and {line}); "
                                    "keep one", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep)


def _expanded_size(value, limit: int) -> int:
    """How many characters `value` holds with every shared (aliased) part counted each time it is used, as
    expanding and validating it would copy it; stops counting past `limit`. Shared parts are sized once."""
    sizes: dict[int, int] = {}

    def size(item, depth: int) -> int:
        if isinstance(item, (dict, list)):
            if id(item) not in sizes:
                if depth > 100:
                    raise RecipeError(["the recipe nests sections more than 100 deep"])
                sizes[id(item)] = limit + 1  # a section that contains itself counts as too large
                children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
                total = 1
                for child in children:
                    total += size(child, depth + 1)
                    if total > limit:
                        break
                sizes[id(item)] = total
            return sizes[id(item)]
        return len(item) if isinstance(item, str) else 1

    return size(value, 0)


def read_yaml(path: Path, what: str = "recipe"):
    """A YAML file as plain data: safe types only, no duplicate keys, aliases expanding to a bounded size."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError([f"{path}: not valid YAML: {error}"]) from None
    return parse_yaml(text, str(path), what)


def parse_yaml(text: str, where: str, what: str = "recipe"):
    """YAML text (a file's, or an override's value) as plain data, with read_yaml's checks."""
    try:
        data = yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as error:
        raise RecipeError([f"{where}: not valid YAML: {error}"]) from None
    except RecursionError:
        raise RecipeError([f"{where}: the {what} is nested too deeply to read"]) from None
    if _expanded_size(data, MAX_RECIPE_SIZE) > MAX_RECIPE_SIZE:
        raise RecipeError([f"{where}: the {what} grows past {MAX_RECIPE_SIZE:,} characters once its YAML aliases "
                           "(*name) are expanded; write it out without repeated aliases"])
    return data


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply command-line overrides 'key.path=value'; values are parsed as YAML scalars."""
    problems = []
    for override in overrides:
        if "=" not in override:
            problems.append(f"override {override!r}: expected key.path=value, e.g. train.epochs=3")
            continue
        path, text = override.split("=", 1)
        keys = path.strip().split(".")
        node = raw
        for key in keys[:-1]:
            if isinstance(node, list):  # a list item by position, e.g. model.freeze.stages.0.train
                if not key.isdigit() or int(key) >= len(node):
                    problems.append(f"override {override!r}: {key} is not a position in a list of {len(node)}")
                    break
                child = node[int(key)]
            else:
                child = node.get(key)
                if child is None:
                    child = node[key] = {}
            if not isinstance(child, (dict, list)):
                problems.append(f"override {override!r}: {key} is a value, not a section")
                break
            node = child
        else:
            value = parse_yaml(text, f"override {override!r}", "value") if text.strip() else None
            last = keys[-1]
            if isinstance(node, list):
                if not last.isdigit() or int(last) >= len(node):
                    problems.append(f"override {override!r}: {last} is not a position in a list of {len(node)}")
                    continue
                node[int(last)] = value
            else:
                node[last] = value
    if problems:
        raise RecipeError(problems)
    return raw


def _key_path(loc: tuple) -> tuple:
    """The recipe keys of an error location, without pydantic's union-member tags such as 'int' or "literal['auto']"."""
    tags = {"int", "float", "str", "bool", "list", "dict", "none"}
    return tuple(part for part in loc if not (isinstance(part, str) and (
        part in tags or "[" in part or part.startswith(("function-", "constrained-")))))


def _describe(error: dict, recipe_fields: type[BaseModel], task_type) -> str:
    path = ".".join(str(part) for part in error["loc"]) or "(recipe)"
    if error["type"] == "extra_forbidden" and error["loc"][:1] == ("task",) and isinstance(task_type, str):
        return _foreign_task_key(path, str(error["loc"][-1]), task_type)
    if error["type"] == "extra_forbidden":
        parent = _model_at(recipe_fields, error["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see the docs"
        return f"{path}: unknown key (allowed here: {allowed})"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["loc"]:
        return f"{path}: {message} (got {error.get('input')!r})"
    return f"{message}"


def _foreign_task_key(path: str, key: str, kind: str) -> str:
    """A task setting the recipe's task does not have: whose it is, or which ones this task has."""
    owners = [name for name in task_names() if key in get_task(name).Spec.model_fields]
    if owners:
        return f"{path}: {key} applies to task.type {', '.join(owners)}, not {kind}"
    task = find_task(kind)
    allowed = ", ".join(task.Spec.model_fields) if task else "see the docs"
    return f"{path}: unknown key (allowed here: {allowed})"


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for key in loc:
        field = model.model_fields.get(str(key))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def parse_recipe(raw: dict, source: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError([f"a recipe is a mapping of sections (model, data, task, train, optim, eval, output), "
                           f"not a {type(raw).__name__}"], source=source)
    problems: list[str] = []
    expanded = _expand(raw, problems)
    try:
        recipe = Recipe.model_validate(expanded)
    except ValidationError as error:
        merged: dict[tuple, list[str]] = {}  # a value that fits no member of a union fails once per member
        for item in error.errors():
            item = {**item, "loc": _key_path(item["loc"])}
            # Errors from a section-level check carry the section as location.
            if item["type"] == "value_error" and item["loc"]:
                text = f"{'.'.join(map(str, item['loc']))}: {item['msg'].removeprefix('Value error, ')}"
            else:
                task = expanded.get("task")
                text = _describe(item, Recipe, task.get("type", DEFAULT_TASK) if isinstance(task, dict) else None)
            merged.setdefault(item["loc"], [])
            if text not in merged[item["loc"]]:
                merged[item["loc"]].append(text)
        for loc, texts in merged.items():
            prefix = f"{'.'.join(map(str, loc))}: "
            problems.append(texts[0] if len(texts) == 1 else prefix + " or ".join(t.removeprefix(prefix) for t in texts))
    if problems:
        raise RecipeError(problems, source=source) from None
    return recipe


def load_recipe(source: str | Path | dict | Recipe, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe from a YAML path, a dict or a Recipe, then apply 'key.path=value' overrides."""
    raw, name = raw_recipe(source, overrides)
    return parse_recipe(raw, source=name)


def raw_recipe(source: str | Path | dict | Recipe, overrides: list[str] | None = None) -> tuple[dict, str]:
    """A recipe as written, overrides applied, before ${VAR} expansion and validation; and where it came from."""
    if isinstance(source, Recipe):
        raw, name = source.model_dump(mode="json"), "recipe"
    elif isinstance(source, dict):
        raw, name = copy.deepcopy(source), "recipe"  # overrides must not change the caller's dict
    else:
        path = Path(source)
        if path.is_dir():
            found = sorted(p.name for p in path.glob("*.yaml"))[:3]
            raise RecipeError([f"recipe {path} is a folder; give the recipe's YAML file"
                               + (f", e.g. {path / found[0]}" if found else "")])
        if not path.is_file():
            raise RecipeError([f"recipe file {path} does not exist"])
        raw = read_yaml(path) or {}
        name = str(path)
    if overrides and isinstance(raw, dict):  # a non-mapping is reported as such by parse_recipe
        raw = apply_overrides(raw, overrides)
    return raw, name
