"""The model card (README.md of an exported folder), written only from the run's own records.

Sources: RUN/recipe.yaml (the resolved recipe), RUN/metrics.jsonl (data sizes, parameter counts,
stages, evaluations), RUN/eval.json (final metrics, hardware, time) and the model folder's
tuneforge.json (labels). A fact the records do not hold is said to be unknown, never guessed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tuneforge.config import read_yaml

SUMMARY_METRICS = {
    "classification": ("accuracy", "f1_macro", "precision_macro", "recall_macro", "auc_roc", "loss"),
    "multilabel": ("f1_micro", "f1_macro", "precision_micro", "recall_micro", "auc_roc", "exact_match", "loss"),
    "regression": ("rmse", "mae", "r2", "baseline_rmse", "baseline_r2", "loss"),
    "segmentation": ("mean_iou", "mean_dice", "pixel_accuracy", "loss"),
    "detection": ("map_50", "map", "mean_iou", "loss"),
    "seq2seq": ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "meteor", "loss"),
    "captioning": ("bleu", "chrf", "rougeL", "meteor", "loss"),
    "qa": ("exact_match", "f1", "loss"),
    "causal_lm": ("perplexity", "loss"),
}
WHAT = {"classification": "classifier", "multilabel": "multi-label classifier", "regression": "regression model",
        "segmentation": "semantic segmentation model", "detection": "object detector",
        "seq2seq": "sequence-to-sequence model", "captioning": "image captioning model",
        "qa": "extractive question answering model", "causal_lm": "language model"}
TEXT_TASKS = ("seq2seq", "captioning", "qa", "causal_lm")


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
    generates = task.get("type") in ("seq2seq", "captioning", "causal_lm")  # their pretrained LM head gets no dropout
    regularisation = [] if generates else [f"head dropout {recipe['model']['head_dropout']}"]
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
    info = json.loads((model_dir / "tuneforge.json").read_text())
    has_run = run_dir is not None and (run_dir / "recipe.yaml").is_file()
    recipe = read_yaml(run_dir / "recipe.yaml") if has_run else None
    records = _records(run_dir) if has_run else []
    result = json.loads((run_dir / "eval.json").read_text()) if has_run and (run_dir / "eval.json").exists() else {}
    data, parameters = _first(records, "data"), _first(records, "parameters")
    model_spec = (recipe or {}).get("model", {})
    base = model_spec.get("name") or model_spec.get("factory") or "unknown (no run records)"
    title = (recipe or {}).get("name", model_dir.name)

    kind = info.get("task", "classification")
    lines = [f"# {title}", "",
             f"A {info['modality']} {WHAT[kind]} fine-tuned with tuneforge. Everything below comes from the run's own "
             f"records{f' in `{run_dir}`' if has_run else ''}; what they do not hold is marked unknown.", "",
             "## Model", "",
             f"- Base model: `{base}`" + (f" (weights file `{model_spec['weights']}`)" if model_spec.get("weights") else "")
             + ("; pretrained weights" if model_spec.get("pretrained", True) else "; random initialisation"),
             f"- Loading: {data.get('model_load', 'unknown')}",
             f"- Head: {_head(kind, info)}",
             f"- Parameters: {parameters['total']:,} in all, {parameters['trainable']:,} trained"
             if parameters else "- Parameters: unknown",
             f"- Export format: `{fmt}`" + (f"; largest difference from the PyTorch model's logits on check inputs: "
                                            f"{max_abs_diff:.2e}" if max_abs_diff is not None else ""),
             "- Input: " + _input(kind, info),
             ""]
    if kind == "regression":
        lines += ["### Targets", ""] + _table(
            ["output", "column", "training mean", "training std"],
            [[i, name, _number(mean), _number(std)] for i, (name, mean, std)
             in enumerate(zip(info["label_names"], info["target_mean"], info["target_std"]))])
        lines += ["", "The network learned the targets scaled to mean 0 and std 1 by the values above; tuneforge and "
                  "every exported format give predictions in the data's own units."]
    elif kind not in TEXT_TASKS:
        lines += ["### Labels", ""] + _table(
            ["output index" if kind == "multilabel" else "class index", "label value", "name"],
            [[i, value, name] for i, (value, name) in enumerate(zip(info["label_values"], info["label_names"]))])
        if kind == "multilabel":
            lines += ["", f"A label is predicted when its sigmoid probability exceeds {info['threshold']}"
                      + (" (chosen for the best micro F1 on the validation split)."
                         if (recipe or {}).get("task", {}).get("threshold") == "tune" else ".")]
    lines += ["", "## Training data", ""]
    if data:
        lines += _table(["split", "source", "examples"],
                        [[name, f"`{split['source']}`", split["examples"]] for name, split in data["splits"].items()])
        if data.get("train_class_counts"):
            per = "label" if kind == "multilabel" else "class"
            lines += ["", f"Training examples per {per}: "
                      + ", ".join(f"{k} {v}" for k, v in data["train_class_counts"].items())]
        for name, target in (data.get("train_targets") or {}).items():
            lines += ["", f"Training target {name}: mean {target['mean']:.4g}, range {target['min']:.4g} to "
                          f"{target['max']:.4g}"]
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
        shown = [m for m in SUMMARY_METRICS[kind] if any(m in s for s in splits.values())]
        interval = ["accuracy 95% interval"] if kind == "classification" else []
        lines += _table(["split", "examples", *shown, *interval],
                        [[name, s.get("num_examples"), *(_number(s.get(m)) for m in shown),
                          *([_interval(s.get("accuracy"), s.get("num_examples"))] if interval else [])]
                         for name, s in splits.items()])
        for name, s in splits.items():
            if s.get("per_class") and kind == "detection":
                lines += ["", f"Per class on {name}:", ""]
                lines += _table(["class", "AP@[.5:.95]", "AP@.5", "boxes"], [[label, _number(c["ap"]), _number(c["ap_50"]),
                                                                             c["boxes"]] for label, c in s["per_class"].items()])
            elif s.get("per_class") and kind == "segmentation":
                lines += ["", f"Per class on {name}:", ""]
                lines += _table(["class", "IoU", "Dice", "pixels"], [[label, _number(c["iou"]), _number(c["dice"]),
                                                                       c["pixels"]] for label, c in s["per_class"].items()])
            elif s.get("per_class"):
                lines += ["", f"Per class on {name}:", ""]
                lines += _table(["class", "precision", "recall", "F1", "examples"],
                                [[label, _number(c["precision"]), _number(c["recall"]), _number(c["f1"]), c["support"]]
                                 for label, c in s["per_class"].items()])
            if s.get("per_target") and len(s["per_target"]) > 1:
                lines += ["", f"Per target on {name}:", ""]
                lines += _table(["target", "RMSE", "MAE", "R²"], [[target, _number(t["rmse"]), _number(t["mae"]),
                                                                   _number(t["r2"])] for target, t in s["per_target"].items()])
    else:
        lines.append("Unknown: the run recorded no evaluation.")
    sources = ", ".join(f"`{s['source']}`" for s in data.get("splits", {}).values()) or "unknown"
    smallest = min(data["train_class_counts"].values()) if data.get("train_class_counts") else None
    purpose = {"classification": "Assigning one of the labels above to", "multilabel": "Assigning any of the labels "
               "above (none, one or several) to", "regression": "Predicting the targets above for",
               "segmentation": "Assigning one of the classes above to every pixel of",
               "detection": "Finding and boxing objects of the classes above in",
               "seq2seq": "Writing the target text for", "captioning": "Describing in text",
               "qa": "Finding the answer span of a question in the context of", "causal_lm": "Continuing"}[kind]
    lines += ["", "## Intended use", "",
              f"{purpose} {info['modality']} inputs like those of the training data "
              f"({sources}). Inputs must be prepared the same way: "
              + ("the saved tokenizer, questions with their contexts" if kind == "qa" else
                 f"the saved tokenizer, columns {info['data'].get('text_column')}"
                 + (f" and {info['data']['text_pair_column']}" if info['data'].get('text_pair_column') else "")
                 if info["modality"] == "text" else "the saved image processor") + ".",
              "", "## Known limitations", "",
              "- Measured only on the splits above; accuracy on other sources, domains or languages is unknown.",
              *_limitations(kind, smallest, data), ""]
    return "\n".join(lines)


def _input(kind: str, info: dict) -> str:
    if kind == "qa":
        return (f"a question and its context, in windows of {info['max_length']} tokens overlapping by "
                f"{info['task_settings']['stride']} (a long context is read whole, window by window)")
    if kind == "captioning":
        return "RGB images"
    if info["modality"] == "text":
        return f"text, up to {info['max_length']} tokens (longer texts are truncated)"
    return "RGB images"


def _head(kind: str, info: dict) -> str:
    count = len(info["label_names"])
    if kind in TEXT_TASKS:
        return {"qa": "a new span head scoring each token as the answer's start and end",
                "causal_lm": "the pretrained language-model head (next-token prediction)",
                "seq2seq": "the pretrained decoder and language-model head",
                "captioning": "a text decoder reading the vision encoder through cross-attention"}[kind] + (
            f"; generation with beam width {info['task_settings']['num_beams']}, at most "
            f"{info['task_settings']['max_new_tokens']} new tokens" if kind != "qa" else "")
    if kind == "regression":
        return f"a new regression head with {count} output(s), one per target"
    if kind == "multilabel":
        return f"a new head with one sigmoid output per label ({count} labels)"
    if kind == "segmentation":
        return f"a new decode head with one output map per class ({count} classes)"
    if kind == "detection":
        return f"a new class head for {count} classes (plus no-object) beside the box head"
    return f"a new classifier for {count} labels"


def _limitations(kind: str, smallest: int | None, data: dict) -> list[str]:
    if kind in TEXT_TASKS:
        return {"qa": ["- It always answers with a span of the context, also when the context holds no answer "
                       "(SQuAD v1.1 style)."],
                "causal_lm": ["- Perplexity measures how well it predicts held-out text of the same kind, not whether "
                              "what it writes is true or safe."],
                "seq2seq": ["- BLEU, chrF, ROUGE and METEOR compare with the references word by word; a correct "
                            "rewording scores lower than it deserves."],
                "captioning": ["- BLEU, ROUGE and METEOR compare with the reference captions word by word; a correct "
                               "but differently worded caption scores lower than it deserves."]}[kind]
    if kind == "regression":
        ranges = data.get("train_targets") or {}
        return ["- Targets in training ranged as listed under Training data; predictions outside that range are "
                "extrapolation and less reliable." if ranges else "- The training targets' range is unknown.",
                "- R² compares with always predicting the evaluation split's own mean; baseline_rmse and "
                "baseline_r2 are those of always predicting the training split's mean."]
    lines = [f"- The rarest {'label' if kind == 'multilabel' else 'class'} had {smallest} training examples; rare "
             "labels are usually predicted less reliably (see the per-class table)." if smallest is not None
             else "- Class balance of the training data: unknown."]
    if kind == "detection":
        return [f"- The rarest class had {smallest} training boxes." if smallest is not None else
                "- Boxes per class in training: unknown.",
                "- mAP is COCO's (pycocotools); boxes below the score threshold are left out of predictions only."]
    if kind == "segmentation":
        return ["- Per-class IoU and Dice are in the tables above; classes with few pixels are usually segmented "
                "less reliably.", "- Masks are predicted at the model's input resolution and upsampled to each image's "
                "size, so thin structures may be lost."]
    if kind == "classification":
        lines += ["- The intervals above reflect only the size of each evaluation split (binomial, 95 %), not a shift "
                  "between the data it was tested on and the data it will see.",
                  "- It always answers with one of its labels, also for inputs that belong to none of them."]
    else:
        lines.append("- The threshold trades precision for recall for every label at once; a label-specific use may "
                     "want its own.")
    return lines


def write_model_card(run: str | Path, model_dir: Path, output: Path, fmt: str, max_abs_diff: float | None) -> Path:
    run = Path(run)
    run_dir = run if (run / "recipe.yaml").is_file() else run.parent if (run.parent / "recipe.yaml").is_file() else None
    path = output / "README.md"
    path.write_text(model_card(run_dir, model_dir, fmt, max_abs_diff))
    return path
