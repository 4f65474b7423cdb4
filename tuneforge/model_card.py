"""The model card (README.md of an exported folder), written only from the run's own records.

Sources: RUN/recipe.yaml (the resolved recipe), RUN/metrics.jsonl (data sizes, parameter counts,
stages, evaluations), RUN/eval.json (final metrics, hardware, time) and the model folder's
tuneforge.json (labels). A fact the records do not hold is said to be unknown, never guessed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

SUMMARY_METRICS = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "auc_roc", "loss")


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _first(records: list[dict], kind: str) -> dict:
    return next((r for r in records if r["type"] == kind), {})


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _strategy(recipe: dict) -> list[str]:
    freeze, optim, train, task = recipe["model"]["freeze"], recipe["optim"], recipe["train"], recipe["task"]
    lines = [f"- Freezing plan: `{freeze['strategy']}`"
             + (f", the last {freeze['trainable_blocks']} blocks train" if freeze.get("trainable_blocks") else "")]
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
    regularisation = [f"head dropout {recipe['model']['head_dropout']}"]
    if task.get("label_smoothing"):
        regularisation.append(f"label smoothing {task['label_smoothing']}")
    if task.get("class_weights"):
        regularisation.append(f"class weights {task['class_weights']}")
    if optim.get("l2sp"):
        regularisation.append(f"L2-SP {optim['l2sp']}")
    augment = {k: v for k, v in (recipe["data"].get("augment") or {}).items() if v}
    if augment:
        regularisation.append("augmentation " + ", ".join(f"{k} {v}" for k, v in augment.items()))
    stopping = recipe["eval"].get("early_stopping")
    if stopping:
        regularisation.append(f"early stopping (patience {stopping['patience']})")
    lines.append(f"- Regularisation: {', '.join(regularisation)}")
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
    info = json.loads((model_dir / "tuneforge.json").read_text())
    has_run = run_dir is not None and (run_dir / "recipe.yaml").is_file()
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) if has_run else None
    records = _records(run_dir) if has_run else []
    result = json.loads((run_dir / "eval.json").read_text()) if has_run and (run_dir / "eval.json").exists() else {}
    data, parameters = _first(records, "data"), _first(records, "parameters")
    model_spec = (recipe or {}).get("model", {})
    base = model_spec.get("name") or model_spec.get("factory") or "unknown (no run records)"
    title = (recipe or {}).get("name", model_dir.name)

    lines = [f"# {title}", "",
             f"A {info['modality']} classifier fine-tuned with tuneforge. Everything below comes from the run's own "
             f"records{f' in `{run_dir}`' if has_run else ''}; what they do not hold is marked unknown.", "",
             "## Model", "",
             f"- Base model: `{base}`" + (f" (weights file `{model_spec['weights']}`)" if model_spec.get("weights") else "")
             + ("; pretrained weights" if model_spec.get("pretrained", True) else "; random initialisation"),
             f"- Loading: {data.get('model_load', 'unknown')}",
             f"- Head: a new classifier for {len(info['label_names'])} labels",
             f"- Parameters: {parameters['total']:,} in all, {parameters['trainable']:,} trained"
             if parameters else "- Parameters: unknown",
             f"- Export format: `{fmt}`" + (f"; largest difference from the PyTorch model's logits on check inputs: "
                                            f"{max_abs_diff:.2e}" if max_abs_diff is not None else ""),
             "- Input: " + (f"text, up to {info['max_length']} tokens (longer texts are truncated)"
                            if info["modality"] == "text" else "RGB images"),
             "", "### Labels", ""]
    lines += _table(["class index", "label value", "name"],
                    [[i, value, name] for i, (value, name) in enumerate(zip(info["label_values"], info["label_names"]))])
    lines += ["", "## Training data", ""]
    if data:
        lines += _table(["split", "source", "examples"],
                        [[name, f"`{split['source']}`", split["examples"]] for name, split in data["splits"].items()])
        lines += ["", "Training examples per class: " + ", ".join(f"{k} {v}" for k, v in data["train_class_counts"].items())]
        lines += [f"Note: {note}" for note in data.get("notes", [])]
    else:
        lines.append("Unknown: the run's records hold no data summary.")
    lines += ["", "## Fine-tuning strategy", ""] + (_strategy(recipe) if recipe else ["Unknown: no recipe.yaml."])
    lines += ["", "## Training", ""]
    if result:
        hardware = result.get("hardware", {})
        lines += [f"- {result['steps']} optimizer steps; best model at step {result.get('best_step')}"
                  + ("; stopped early" if result.get("stopped_early") else ""),
                  f"- Training time: {result['train_seconds']} s on {hardware.get('device')} "
                  f"({hardware.get('processes')} process(es), {hardware.get('cpu_count')} CPU cores; torch "
                  f"{hardware.get('torch')}, Python {hardware.get('python')})"]
    else:
        lines.append("Unknown: no eval.json.")
    lines += ["", "## Evaluation", ""]
    splits = result.get("splits", {})
    if splits:
        shown = [m for m in SUMMARY_METRICS if any(m in s for s in splits.values())]
        lines += _table(["split", "examples", *shown, "accuracy 95% interval"],
                        [[name, s.get("num_examples"), *(_number(s.get(m)) for m in shown),
                          _interval(s.get("accuracy"), s.get("num_examples"))] for name, s in splits.items()])
        for name, s in splits.items():
            if s.get("per_class"):
                lines += ["", f"Per class on {name}:", ""]
                lines += _table(["class", "precision", "recall", "F1", "examples"],
                                [[label, _number(c["precision"]), _number(c["recall"]), _number(c["f1"]), c["support"]]
                                 for label, c in s["per_class"].items()])
    else:
        lines.append("Unknown: the run recorded no evaluation.")
    sources = ", ".join(f"`{s['source']}`" for s in data.get("splits", {}).values()) or "unknown"
    smallest = min(data["train_class_counts"].values()) if data.get("train_class_counts") else None
    lines += ["", "## Intended use", "",
              f"Assigning one of the labels above to {info['modality']} inputs like those of the training data "
              f"({sources}). Inputs must be prepared the same way: "
              + (f"the saved tokenizer, columns {info['data'].get('text_column')}"
                 + (f" and {info['data']['text_pair_column']}" if info['data'].get('text_pair_column') else "")
                 if info["modality"] == "text" else "the saved image processor") + ".",
              "", "## Known limitations", "",
              "- Measured only on the splits above; accuracy on other sources, domains or languages is unknown.",
              "- The intervals above reflect only the size of each evaluation split (binomial, 95 %), not a shift "
              "between the data it was tested on and the data it will see.",
              f"- The rarest class had {smallest} training examples; rare classes are usually predicted less reliably "
              "(see the per-class table)." if smallest is not None else "- Class balance of the training data: unknown.",
              "- It always answers with one of its labels, also for inputs that belong to none of them.",
              ""]
    return "\n".join(lines)


def write_model_card(run: str | Path, model_dir: Path, output: Path, fmt: str, max_abs_diff: float | None) -> Path:
    run = Path(run)
    run_dir = run if (run / "recipe.yaml").is_file() else run.parent if (run.parent / "recipe.yaml").is_file() else None
    path = output / "README.md"
    path.write_text(model_card(run_dir, model_dir, fmt, max_abs_diff))
    return path
