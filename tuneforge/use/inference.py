"""Use a finished run: evaluate it on new labelled data, predict new inputs, inspect a model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from tuneforge.data.loaders import make_dataset, make_loader
from tuneforge.data.preflight import check_split, check_targets, encode_targets, unknown_labels
from tuneforge.data.sources import read_split
from tuneforge.errors import DataError, ModelError, first_line, listing
from tuneforge.training.loop import predict_logits
from tuneforge.models.loading import LoadedModel, load_model_folder
from tuneforge.config import TEXT_TASKS


def model_folder(run: str | Path) -> Path:
    run = Path(run)
    folder = run / "model" if (run / "model" / "config.json").is_file() else run
    if not (folder / "config.json").is_file() or not (folder / "tuneforge.json").is_file():
        raise ModelError([f"{run} is neither a run directory nor a tuneforge model folder (no model/config.json)"])
    return folder


def read_model_info(folder: Path) -> dict:
    """A model folder's tuneforge.json, or a clear error when it is damaged."""
    try:
        info = json.loads((folder / "tuneforge.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError([f"{folder / 'tuneforge.json'} is damaged ({first_line(error)}); export or train the model "
                          "again"]) from None
    if not isinstance(info, dict) or not isinstance(info.get("data"), dict):
        raise ModelError([f"{folder / 'tuneforge.json'} is not a tuneforge model description"])
    return info


def _prepared(predictor, split, targets: list):
    """The model and a whole file's evaluation loader (batches, shortest first), not input by input."""
    dataset = make_dataset(split, targets, predictor.loaded.preprocessor, predictor.info["max_length"],
                           predictor.task.name, predictor.info["label_values"])
    accelerator = Accelerator()
    model, loader = accelerator.prepare(predictor.loaded.model, make_loader(dataset, 64, "auto"))
    return model, loader, accelerator


def _logits(predictor, split, targets: list):
    return predict_logits(*_prepared(predictor, split, targets))


def evaluate_run(run: str | Path, data: str | Path, output: str | Path | None = None, factory=None) -> dict:
    """All of the task's metrics for a run's model on a labelled file or image folder (`factory`: see
    tuneforge.load)."""
    from tuneforge.use.predictor import load

    predictor = load(run, factory)
    info, spec, kind = predictor.info, predictor.data_spec, predictor.task.name
    if kind in TEXT_TASKS:
        metrics = predictor.task.evaluate(*_text_task_loader(predictor, data))
        if output:
            Path(output).write_text(json.dumps(metrics, indent=2))
        return metrics
    split = read_split("evaluation", str(data), spec)
    problems = split.problems or check_split(split, spec, [], kind=kind)
    if kind == "classification":
        problems += unknown_labels(split, info["label_values"], "the model cannot predict labels it was not trained on")
    elif not problems:
        problems += (_segmentation_problems(split, predictor) if kind == "segmentation" else
                     check_targets(split, kind, info["label_values"], spec.label_separator, spec.label_column))
    if problems:
        raise DataError(problems)
    targets = encode_targets(kind, split.labels, info["label_values"], spec.label_separator)
    metrics = predictor.task.evaluate(*_prepared(predictor, split, targets))
    if output:
        Path(output).write_text(json.dumps(metrics, indent=2))
    return metrics


def _text_task_loader(predictor, data: str | Path):
    """A labelled file of a text task, read and checked as training read its splits, as an evaluation loader."""
    from types import SimpleNamespace

    from tuneforge.data.text_tasks import load_text_task_data, make_text_task_dataset
    from tuneforge.config import TaskSpec

    info = predictor.info
    task_spec = TaskSpec(type=info["task"], **info["task_settings"])
    data_spec = predictor.data_spec.model_copy(update={"train": str(data)})
    if data_spec.format == "parallel" and Path(data).is_file():  # trained on aligned files, evaluated on a table
        data_spec = data_spec.model_copy(update={"format": "auto"})
    split = load_text_task_data(data_spec, task_spec).splits["train"]
    split.name = "evaluation"
    recipe = SimpleNamespace(task=task_spec, model=SimpleNamespace(max_length=info["max_length"]), data=data_spec)
    dataset = make_text_task_dataset(split, info["task"], predictor.loaded.preprocessor, recipe)
    for note in dataset.notes:
        print(f"data: {note}")
    accelerator = Accelerator()
    model, loader = accelerator.prepare(predictor.loaded.model, make_loader(dataset, 32, "auto"))
    return model, loader, accelerator


def _text_task_inputs(predictor, inputs: str | Path) -> tuple[list, list[str]]:
    """What a text task predicts from, per row: texts or prompts (one a line of a .txt, or a table's column),
    images (a folder, or a table's image column), or {question, context} (SQuAD JSON, or a table with both)."""
    from tuneforge.data.loaders import load_rgb
    from tuneforge.data.qa import read_squad
    from tuneforge.data.sources import IMAGE_SUFFIXES, read_table

    kind, spec, path = predictor.task.name, predictor.data_spec, Path(inputs)
    if kind == "captioning" and path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [load_rgb(p) for p in files], [str(p) for p in files]
    if not path.is_file():
        raise DataError([f"{inputs} not found"])
    if kind == "qa" and path.suffix == ".json":
        examples, problems = read_squad(path)
        if problems:
            raise DataError(problems)
        return [{"question": e.question, "context": e.context} for e in examples], [e.id for e in examples]
    if path.suffix == ".txt":
        lines = [(i, line) for i, line in enumerate(path.read_text(encoding=spec.encoding).splitlines()) if line.strip()]
        return [line for _, line in lines], [f"{path.name}:{i + 1}" for i, _ in lines]
    fmt = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}.get(path.suffix.lower(), "jsonl")
    frame = read_table(path, fmt, spec.columns, spec.encoding)
    columns = {"qa": ["question", "context"], "captioning": [spec.image_column],
               "causal_lm": [spec.prompt_column or spec.text_column]}.get(kind, [spec.text_column])
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise DataError([f"{inputs} has no column(s) {absent}; its columns are {listing(map(str, frame.columns))}"])
    rows = [f"{path.name}:{i + (2 if fmt in ('csv', 'tsv') else 1)}" for i in range(len(frame))]
    if kind == "qa":
        return [{"question": q, "context": c} for q, c in zip(frame["question"], frame["context"])], rows
    if kind == "captioning":
        return [path.parent / str(p) for p in frame[columns[0]]], rows
    return [str(t) for t in frame[columns[0]]], rows


def _segmentation_problems(split, predictor) -> list[str]:
    """The masks checked against the model's label map, as training checked them."""
    from tuneforge.data.preflight import segmentation_data
    from tuneforge.config import TaskSpec

    info = predictor.info
    spec = TaskSpec(type="segmentation", labels=info["label_values"], ignore_index=info["ignore_index"])
    try:
        segmentation_data({"evaluation": split}, spec, predictor.data_spec, [], [])
    except DataError as error:
        return error.problems
    return []


def predict_run(run: str | Path, inputs: str | Path, output: str | Path, draw: str | Path | None = None,
                factory=None) -> int:
    """Write the task's prediction per input row (or image) to a .jsonl or .csv file. Segmentation also
    writes each predicted mask, at its image's size, as OUTPUT-masks/<image name>.png (class index per pixel);
    detection with `draw`, each image with its boxes drawn, into that folder."""
    from tuneforge.use.predictor import load

    predictor = load(run, factory)
    spec = predictor.data_spec
    if predictor.task.name in TEXT_TASKS:
        items, rows = _text_task_inputs(predictor, inputs)
        predictions = [p for start in range(0, len(items), 32) for p in predictor.predict(list(items[start:start + 32]))]
        _write_predictions(predictor.task, rows, predictions, Path(output))
        return len(predictions)
    split = read_split("input", str(inputs), spec, require_labels=False)
    problems = split.problems or check_split(split, spec, [], require_labels=False)
    if problems:
        raise DataError(problems)
    task, output = predictor.task, Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if task.name == "segmentation":
        predictions = _write_masks(predictor, split, output.parent / f"{output.stem}-masks")
    elif task.name == "detection":
        predictions = _detect(predictor, split, Path(draw) if draw else None)
    else:
        predictions = task.predictions(_logits(predictor, split, [0] * len(split))[0])
    _write_predictions(task, split.rows, predictions, output)
    return len(predictions)


def _write_predictions(task, rows: list[str], predictions: list[dict], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".csv":
        with output.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["row", *task.csv_header()])
            for row, prediction in zip(rows, predictions):
                writer.writerow([row, *task.csv_row(prediction)])
    else:
        with output.open("w") as file:
            for row, prediction in zip(rows, predictions):
                file.write(json.dumps({"row": row, **prediction}) + "\n")


def _write_masks(predictor, split, folder: Path) -> list[dict]:
    """Batch by batch (no split-sized tensor): each mask upsampled to its image's size and saved as a PNG."""
    import torch
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    model, loader, accelerator = _prepared(predictor, split, [None] * len(split))
    model.eval()
    predictions = {}
    with torch.inference_mode():
        for batch in loader:
            logits = model(**batch["inputs"]).logits
            for row_logits, index in zip(logits, batch["index"].tolist()):
                path = split.image_paths[index]
                with Image.open(path) as image:
                    size = (image.height, image.width)
                mask = predictor.task.masks(row_logits[None], size=size)[0]
                target = folder / f"{Path(path).stem}.png"
                Image.fromarray(mask.numpy().astype(np.uint8 if len(predictor.task.label_names) < 256 else np.int32)).save(target)
                predictions[index] = {"mask_file": str(target), "class_fractions": predictor.task.class_fractions(mask)}
    return [predictions[i] for i in range(len(split))]


def _detect(predictor, split, draw: Path | None) -> list[dict]:
    """Boxes above the score threshold per image, in its own pixels; with `draw`, the images with them drawn."""
    import torch
    from PIL import ImageDraw

    from tuneforge.data.loaders import load_rgb

    model, loader, accelerator = _prepared(predictor, split, [None] * len(split))
    model.eval()
    task, predictions = predictor.task, {}
    if draw is not None:
        draw.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for batch in loader:
            for index, found in zip(batch["index"].tolist(), task.detections(model(**batch["inputs"]), batch["sizes"])):
                predictions[index] = task.format(found)
                if draw is not None:
                    image = load_rgb(split.image_paths[index])
                    pen = ImageDraw.Draw(image)
                    for box in predictions[index]["boxes"]:
                        pen.rectangle(box["box"], outline=(255, 40, 40), width=max(2, image.width // 200))
                        pen.text((box["box"][0] + 3, box["box"][1] + 2), f"{box['label']} {box['score']:.2f}",
                                 fill=(255, 40, 40))
                    image.save(draw / f"{Path(split.image_paths[index]).stem}.png")
    return [predictions[i] for i in range(len(split))]


def inspect_model(reference: str | None, weights: str | None = None, num_labels: int = 2,
                  recipe: str | None = None, overrides: list[str] | None = None, factory=None) -> list:
    """Print the layer groups (stem/embeddings, each block, neck, head) with parameter counts,
    and with a recipe, what trains in each stage of its freezing plan."""
    from rich.console import Console

    from tuneforge.models.groups import layer_groups, render_groups

    console = Console()
    if recipe is not None:
        loaded, plan_rows, fixed = _recipe_model_and_plan(recipe, overrides or [])
    else:
        loaded, plan_rows, fixed = _reference_model(reference, weights, num_labels, factory), None, []
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    console.print(render_groups(groups))
    if plan_rows:
        from rich.table import Table

        table = Table(title="freezing plan")
        for column in ("stage", "starts at step", "epoch", "groups that train", "LR x", "trainable parameters"):
            table.add_column(column)
        for row in plan_rows:
            table.add_row(str(row["stage"]), str(row["start_step"]), str(row["start_epoch"]), ", ".join(row["groups"]),
                          f"{row['lr_multiplier']:g}", f"{row['trainable_parameters']:,}")
        console.print(table)
        console.print(f"fixed prefix (frozen in every stage, eval mode, computed once by the feature cache): "
                      f"{', '.join(fixed) if fixed else 'none'}", soft_wrap=True)
    return groups


def _reference_model(reference: str, weights: str | None, num_labels: int, factory=None) -> LoadedModel:
    from tuneforge.models.loading import load_model
    from tuneforge.config import ImageSpec, ModelSpec

    path = Path(reference)
    if (path / "tuneforge.json").is_file() or (path / "model" / "tuneforge.json").is_file():
        return load_model_folder(model_folder(path), factory)[0]
    if ":" in reference and not reference.startswith("pkg:") and not path.exists():
        spec = ModelSpec(factory=reference, weights=weights, pretrained=weights is not None)
    else:
        spec = ModelSpec(name=reference)
    return load_model(spec, [str(i) for i in range(num_labels)], ImageSpec(size=32))


def _recipe_model_and_plan(recipe_path: str, overrides: list[str]) -> tuple[LoadedModel, list[dict], list[str]]:
    """The recipe's model with the recipe's labels, and its freezing plan resolved against it."""
    from tuneforge.models.adapters import adapter_scope, apply_adapter
    from tuneforge.data.preflight import load_task_data
    from tuneforge.strategies.freeze import build_plan, describe_plan
    from tuneforge.models.groups import layer_groups
    from tuneforge.models.loading import load_model
    from tuneforge.config import load_recipe
    from tuneforge.training.run import training_length

    recipe = load_recipe(recipe_path, overrides)
    data = load_task_data(recipe.data, recipe.task)
    loaded = load_model(recipe.model, data.label_names, recipe.data.image, recipe.task.type)
    apply_adapter(loaded, recipe.adapter, recipe.model, recipe.data.image)
    batch = recipe.train.batch_size if recipe.train.batch_size != "auto" else 32  # auto is only known by probing
    updates_per_epoch, total = training_length(-(-len(data.splits["train"]) // batch), recipe.train)
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    plan = build_plan(recipe.model.freeze, groups, loaded.head_prefixes, updates_per_epoch, total, adapter_scope(loaded))
    return loaded, describe_plan(plan, groups, updates_per_epoch), [g.name for g in plan.fixed]
