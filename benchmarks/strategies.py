"""Fine-tuning strategies side by side on real data: the packaged MiniLM on 1,000 SST-2 sentences.

Every strategy gets the same budget (3 epochs, same data, seed, batch size and
evaluation), and the learning rate suited to it: 1e-4 where pretrained blocks
train, more where only the small head does (its inputs, BERT's pooled [CLS]
features, vary little, so a small LR barely moves it). Accuracy is on the GLUE validation set
(872), held out; the epoch is chosen on 500 SST-2 dev sentences.

    python benchmarks/strategies.py [--quick] [--only full,LoRA] [--lr 1e-3] [--output docs/strategies.md]

--quick runs every strategy on a tiny configuration (for tests), not real data.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuneforge.config import load_recipe  # noqa: E402
from tuneforge.training.run import finetune  # noqa: E402

STRATEGIES = {
    "full": ({"strategy": "full"}, 1e-4),
    "partial (last 2 blocks)": ({"strategy": "partial", "trainable_blocks": 2}, 1e-4),
    "feature_extraction (pooler + head)": ({"strategy": "feature_extraction"}, 1e-3),
    "head_only": ({"strategy": "head_only"}, 1e-2),
    "progressive (pooler + head, last 2, all)": ({"strategy": "progressive", "stages": [
        {"epochs": 1, "train": ["neck", "head"], "lr_multiplier": 10.0},
        {"epochs": 1, "train": ["last:2", "neck", "head"], "lr_multiplier": 1.0},
        {"epochs": 1, "train": ["all"], "lr_multiplier": 0.5}]}, 1e-4),
    "bitfit (biases + head)": ({"strategy": "bitfit"}, 1e-2),
    "LoRA (rank 8 on query, value; + head)": ({"strategy": "full"}, 1e-3, {"method": "lora", "rank": 8, "alpha": 16}),
    "prompt tuning (20 vectors; + head)": ({"strategy": "full"}, 3e-2, {"method": "prompt", "virtual_tokens": 20}),
    "prefix tuning (20 keys/values per layer; + head)": ({"strategy": "full"}, 3e-2,
                                                         {"method": "prefix", "virtual_tokens": 20}),
}


def base_overrides(quick: bool) -> list[str]:
    if quick:
        return ["data.max_train_examples=64", "data.max_validation_examples=32", "train.epochs=3",
                "train.batch_size=16", "train.log_every_steps=100"]
    return ["data.max_train_examples=1000", "train.epochs=3", "train.log_every_steps=100"]


def run_strategy(recipe: str, name: str, overrides: list[str], workdir: Path, lr: float | None = None) -> dict:
    freeze, default_lr, *adapter = STRATEGIES[name]
    lr = lr or default_lr
    settings = load_recipe(recipe, [*overrides, f"optim.lr={lr}"]).model_dump(mode="json")
    settings["model"]["freeze"] = freeze
    settings["adapter"] = adapter[0] if adapter else {"method": "none"}
    result = finetune(settings, output_dir=workdir / name.split()[0], console=Console(file=io.StringIO()))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    trainable = max(r["trainable_parameters"] for r in records if r["type"] == "stage")  # LoRA: adapter + head
    caching = sum(r["seconds"] for r in records if r["type"] == "feature_cache")  # counted: it replaces forward passes
    return {"strategy": name, "lr": lr, "accuracy": result.metrics["accuracy"], "f1_macro": result.metrics["f1_macro"],
            "trainable": trainable, "seconds": result.metrics["train_seconds"] + caching}


def to_markdown(rows: list[dict], quick: bool) -> str:
    lines = ["| strategy | LR | trainable parameters (max over stages) | GLUE val accuracy | macro F1 | training time (s) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['strategy']} | {row['lr']:g} | {row['trainable']:,} | {row['accuracy']:.3f} | "
                     f"{row['f1_macro']:.3f} | {row['seconds']:.0f} |")
    machine = f"{platform.machine()}, {platform.processor() or 'CPU'}, Python {platform.python_version()}"
    note = "quick configuration (not real results)" if quick else "1,000 SST-2 training sentences, 3 epochs, batch 32"
    return "\n".join(lines) + f"\n\n{note}; machine: {machine}.\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration for tests")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "sst2-minilm.yaml"))
    parser.add_argument("--output", help="write the Markdown table here")
    parser.add_argument("--only", help="comma-separated first words of the strategies to run (e.g. full,LoRA)")
    parser.add_argument("--lr", type=float, help="use this learning rate instead of each strategy's own")
    args = parser.parse_args(argv)
    chosen = [name for name in STRATEGIES if not args.only or name.split()[0] in args.only.split(",")]
    if not chosen:
        parser.error(f"--only {args.only}: no strategy starts with that; they are "
                     f"{', '.join(name.split()[0] for name in STRATEGIES)}")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in chosen:
            rows.append(run_strategy(args.recipe, name, base_overrides(args.quick), Path(workdir), args.lr))
            print(f"{name}: accuracy {rows[-1]['accuracy']:.3f}, {rows[-1]['seconds']:.0f} s", flush=True)
    table = to_markdown(rows, args.quick)
    print(table)
    if args.output:
        Path(args.output).write_text(table)
    return table


if __name__ == "__main__":
    main()
