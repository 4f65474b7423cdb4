"""Search and advice on real data, against the recipe as written: SST-2 with the packaged MiniLM.

1. The recipe as written (recipes/sst2-minilm.yaml, or a smaller sample): its cost C, validation and test.
2. `tuneforge advise`: its cost, its recommendation, and that recommendation trained (strategy: auto).
3. `tuneforge tune` with the default space, stopped from starting trials after `budget` x C (the first trial is
   the recipe as written): the best trial's validation, its test accuracy (measured once), trials per hour.
4. What the feature cache saves a head-only trial: the same trial with and without it.

All in one process, one after the other, so the machine's speed is the same for each.

    python benchmarks/tune_sst2.py [--train 5000] [--budget 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tuneforge  # noqa: E402
from tuneforge.config import load_recipe  # noqa: E402
from tuneforge.training.advise import advise  # noqa: E402

RECIPE = ROOT / "recipes" / "sst2-minilm.yaml"


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def accuracy(metrics: dict, split: str) -> float | None:
    return metrics["splits"].get(split, {}).get("accuracy")


def advise_and_auto(overrides: list, work: Path, figures: dict, console: Console) -> None:
    """What advise recommends, and the recommendation trained (strategy: auto)."""
    quiet = Console(quiet=True)
    advice, advise_cost = timed(advise, RECIPE, overrides, output_dir=work / "advice", console=quiet)
    auto, auto_cost = timed(tuneforge.finetune, RECIPE, [*overrides, "model.freeze.strategy=auto"],
                            output_dir=work / "auto", console=quiet)
    rec = advice.recommendation
    figures["advice"] = {"seconds": round(advise_cost, 1), "strategy": rec.strategy, "blocks": rec.trainable_blocks,
                         "lr": rec.lr, "epochs": rec.epochs, "reasons": rec.reasons,
                         "trained_seconds": round(auto_cost, 1), "validation": accuracy(auto.metrics, "validation"),
                         "test": accuracy(auto.metrics, "test"), "probe": advice.record()["probe"]}
    console.print(f"advice: {figures['advice']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=5000, help="training examples (default 5000, the recipe's)")
    parser.add_argument("--budget", type=float, default=3.0, help="the search's budget in default runs (default 3)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--only-tune", action="store_true", help="the default run and the study only")
    args = parser.parse_args(argv)
    quiet, console = Console(quiet=True), Console()
    overrides = [f"data.max_train_examples={args.train}", "train.log_every_steps=1000"]
    figures: dict = {"train_examples": args.train}
    with tempfile.TemporaryDirectory(prefix="tuneforge-tune-sst2-") as scratch:
        work = Path(scratch)
        default, cost = timed(tuneforge.finetune, RECIPE, overrides, output_dir=work / "default", console=quiet)
        figures["default"] = {"seconds": round(cost, 1), "validation": accuracy(default.metrics, "validation"),
                              "test": accuracy(default.metrics, "test")}
        console.print(f"default: {figures['default']}")

        if not args.only_tune:
            advise_and_auto(overrides, work, figures, console)
        summary, tune_cost = timed(tuneforge.tune, RECIPE, overrides, trials=1000, timeout=(args.budget - 1) * cost,
                                   output_dir=work / "study", console=quiet)
        trials = sum(summary.states.values())
        figures["tune"] = {"seconds": round(tune_cost, 1), "budget_seconds": round(args.budget * cost, 1),
                           "trials": summary.states, "trials_per_hour": round(trials / tune_cost * 3600, 1),
                           "as_written_validation": summary.as_written_value, "best_trial": summary.best_trial,
                           "best_validation": summary.best_value, "best_test": (summary.test or {}).get("accuracy"),
                           "best_values": summary.best_values, "advice_trial": summary.advice_trial,
                           "advice_validation": summary.advice_value}
        console.print(f"tune: {figures['tune']}")

        if args.only_tune:
            return report(figures, args.json)
        head_only = [*overrides, "model.freeze.strategy=head_only", "optim.lr=1e-2", "train.epochs=3"]
        cached, with_cache = timed(tuneforge.finetune, RECIPE, head_only, output_dir=work / "cached", console=quiet)
        _, without = timed(tuneforge.finetune, RECIPE, [*head_only, "train.cache_features=false"],
                           output_dir=work / "plain", console=quiet)
        figures["head_only_trial"] = {"with_cache_seconds": round(with_cache, 1), "without_seconds": round(without, 1),
                                      "ratio": round(without / with_cache, 1),
                                      "validation": accuracy(cached.metrics, "validation")}
        console.print(f"head-only trial: {figures['head_only_trial']}")
    figures["recipe"] = load_recipe(RECIPE, overrides).name
    return report(figures, args.json)


def report(figures: dict, path: str | None) -> int:
    print(json.dumps(figures, indent=2))
    if path:
        Path(path).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
