"""The model card (README.md of an exported folder), written only from the run's own records.

Sources: RUN/recipe.yaml (the resolved recipe), RUN/metrics.jsonl (data sizes, parameter counts,
stages, evaluations), RUN/eval.json (final metrics, hardware, time) and the model folder's
tuneforge.json (labels). A fact the records do not hold is said to be unknown, never guessed. What a
card says about the task (its head, its labels, its per-class tables, its limits) the task writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tuneforge.artifacts import EVAL_FILE, RECIPE_FILE, read_model_info, read_records, run_of, task_of
from tuneforge.config import read_yaml
from tuneforge.tasks.cards import number, table


def _first(records: list[dict], kind: str) -> dict:
    return next((r for r in records if r.get("type") == kind), {})


def _strategy(recipe: dict, task, advice: dict) -> list[str]:
    freeze, optim, train = recipe["model"]["freeze"], recipe["optim"], recipe["train"]
    lines = [f"- Freezing plan: `{freeze['strategy']}`"
             + (f", the last {freeze['trainable_blocks']} blocks train" if freeze.get("trainable_blocks") else "")]
    if advice:
        lines.append("  - chosen by `strategy: auto` (tuneforge advise, before training): " + "; ".join(advice["reasons"]))
    for index, stage in enumerate(freeze.get("stages") or []):
        length = f"{stage['epochs']} epochs" if stage.get("epochs") else f"{stage['steps']} steps"
        lines.append(f"  - stage {index}: {length}, trains {', '.join(stage['train'])}, LR x{stage['lr_multiplier']}")
    adapter = recipe.get("adapter") or {"method": "none"}
    if adapter["method"] == "prompt":
        lines.append(f"- Adapter: prompt tuning, {adapter['virtual_tokens']} learned vectors after the first token")
    elif adapter["method"] == "prefix":
        lines.append(f"- Adapter: prefix tuning, {adapter['virtual_tokens']} learned keys and values per attention layer")
    elif adapter["method"] != "none":
        detail = "" if adapter["method"] == "ia3" else f", rank {adapter['rank']}, alpha {adapter['alpha']}, dropout {adapter['dropout']}"
        lines.append(f"- Adapter: {adapter['method']}{detail}, on {adapter['target_modules'] or 'the architecture default'}")
    else:
        lines.append("- Adapter: none")
    schedule = optim["schedule"]
    warmup = schedule.get("warmup_ratio") or schedule.get("warmup_steps")
    lines.append(f"- Optimizer: AdamW, learning rate {optim['lr']} ({optim.get('lr_strategy', 'single')}), weight decay "
                 f"{optim['weight_decay']}, schedule `{schedule['name']}`" + (f" with warmup {warmup}" if warmup else ""))
    # A pretrained language-model head (the generators') gets no dropout of its own.
    regularisation = [f"head dropout {recipe['model']['head_dropout']}"] if task.adds_head else []
    regularisation += task.card_regularisation(recipe)
    if optim.get("l2sp"):
        regularisation.append(f"L2-SP {optim['l2sp']}")
    augment = {k: v for k, v in (recipe["data"].get("augment") or {}).items() if v}
    if augment:
        regularisation.append("augmentation " + ", ".join(f"{k} {v}" for k, v in augment.items()))
    stopping = recipe["eval"].get("early_stopping")
    if stopping:
        regularisation.append(f"early stopping (patience {stopping['patience']})")
    lines.append("- Regularisation: " + (", ".join(regularisation) or "none beyond the model's own dropout"))
    lines.append(f"- Batch size {train['batch_size']} (gradient accumulation {train['grad_accum_steps']}), up to "
                 f"{train['epochs']} epochs, precision {'fp32' if train['mixed_precision'] == 'no' else train['mixed_precision']}, "
                 "gradient checkpointing "
                 f"{'on' if train['gradient_checkpointing'] else 'off'}, seed {train['seed']}")
    lines.append(f"- Model selection: best `{recipe['eval']['metric']}` ({recipe['eval']['mode']}) on the validation split")
    return lines


def _interval(accuracy: float | None, count: int | None) -> str:
    """A 95 % normal-approximation interval: how far a measured accuracy can be from the true one."""
    if accuracy is None or not count:
        return "n/a"
    half = 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / count)
    return f"{max(0.0, accuracy - half):.3f} to {min(1.0, accuracy + half):.3f}"


def model_card(run_dir: Path | None, model_dir: Path, fmt: str, max_abs_diff: float | None) -> str:
    info = read_model_info(model_dir)
    task = task_of(info, model_dir)
    recipe = read_yaml(run_dir / RECIPE_FILE) if run_dir is not None else None
    records = read_records(run_dir) if run_dir is not None else []
    result = json.loads((run_dir / EVAL_FILE).read_text()) if run_dir is not None and (run_dir / EVAL_FILE).exists() else {}
    data = _first(records, "data")
    lines = [f"# {(recipe or {}).get('name', model_dir.name)}", "",
             f"A {info.modality} {task.description} fine-tuned with tuneforge. Everything below comes from the run's own "
             f"records{f' in `{run_dir}`' if run_dir is not None else ''}; what they do not hold is marked unknown.", "",
             *_model_section(info, task, recipe, records, fmt, max_abs_diff), *task.card_details(info, recipe),
             "", "## Training data", "", *_data_section(data, task),
             "", "## Fine-tuning strategy", "",
             *(_strategy(recipe, task, _first(records, "advice")) if recipe else ["Unknown: no recipe.yaml."]),
             "", "## Training", "", *_training_section(result),
             "", "## Evaluation", "", *_evaluation_section(result, task)]
    sources = ", ".join(f"`{s['source']}`" for s in data.get("splits", {}).values()) or "unknown"
    lines += ["", "## Intended use", "",
              f"{task.purpose} {info.modality} inputs like those of the training data ({sources}). Inputs must be "
              f"prepared the same way: {task.card_preparation(info)}.",
              "", "## Known limitations", "",
              "- Measured only on the splits above; accuracy on other sources, domains or languages is unknown.",
              *task.card_limitations(info, data), ""]
    return "\n".join(lines)


def _model_section(info, task, recipe: dict | None, records: list[dict], fmt: str, max_abs_diff: float | None) -> list[str]:
    model_spec = (recipe or {}).get("model", {})
    base = model_spec.get("name") or model_spec.get("factory") or "unknown (no run records)"
    parameters = _first(records, "parameters")
    return ["## Model", "",
            f"- Base model: `{base}`" + (f" (weights file `{model_spec['weights']}`)" if model_spec.get("weights") else "")
            + ("; pretrained weights" if model_spec.get("pretrained", True) else "; random initialisation"),
            f"- Loading: {_first(records, 'data').get('model_load', 'unknown')}",
            f"- Head: {task.card_head(info)}",
            f"- Parameters: {parameters['total']:,} in all, {parameters['trainable']:,} trained"
            if parameters else "- Parameters: unknown",
            f"- Export format: `{fmt}`" + (f"; largest difference from the PyTorch model's logits on check inputs: "
                                           f"{max_abs_diff:.2e}" if max_abs_diff is not None else ""),
            "- Input: " + task.card_input(info),
            ""]


def _data_section(data: dict, task) -> list[str]:
    if not data:
        return ["Unknown: the run's records hold no data summary."]
    lines = table(["split", "source", "examples"],
                  [[name, f"`{split['source']}`", split["examples"]] for name, split in data["splits"].items()])
    if data.get("train_class_counts"):
        lines += ["", f"Training examples per {task.unit}: " + ", ".join(f"{k} {v}" for k, v in data["train_class_counts"].items())]
    for name, target in (data.get("train_targets") or {}).items():
        lines += ["", f"Training target {name}: mean {target['mean']:.4g}, range {target['min']:.4g} to {target['max']:.4g}"]
    return lines + [f"Note: {note}" for note in data.get("notes", [])]


def _training_section(result: dict) -> list[str]:
    if not result:
        return ["Unknown: no eval.json."]
    hardware = result.get("hardware", {})
    return [f"- {result['steps']} optimizer steps; best model at step {result.get('best_step')}"
            + ("; stopped early" if result.get("stopped_early") else ""),
            f"- Training time: {result['train_seconds']} s on {hardware.get('device')} "
            f"({hardware.get('processes')} process(es), {hardware.get('cpu_count')} CPU cores; torch "
            f"{hardware.get('torch')}, Python {hardware.get('python')})"]


def _evaluation_section(result: dict, task) -> list[str]:
    splits = result.get("splits", {})
    if not splits:
        return ["Unknown: the run recorded no evaluation."]
    shown = [m for m in (task.card_metrics or task.summary_keys) if any(m in s for s in splits.values())]
    interval = ["accuracy 95% interval"] if "accuracy" in shown else []
    lines = table(["split", "examples", *shown, *interval],
                  [[name, s.get("num_examples"), *(number(s.get(m)) for m in shown),
                    *([_interval(s.get("accuracy"), s.get("num_examples"))] if interval else [])]
                   for name, s in splits.items()])
    for name, s in splits.items():
        lines += task.card_split_details(name, s)
    return lines


def write_model_card(run: str | Path, model_dir: Path, output: Path, fmt: str, max_abs_diff: float | None) -> Path:
    path = output / "README.md"
    path.write_text(model_card(run_of(Path(run)), model_dir, fmt, max_abs_diff))
    return path
