"""tuneforge advise: before any training, measure the data, probe the frozen features block by block and run
short learning-rate range tests; recommend a freezing strategy, depth, learning rate and length with the reasons
and figures; and check the recipe's own plan stage by stage. `model.freeze.strategy: auto` trains with the advice.

Writes into DIR (default: the recipe's run directory + -advise): advice.json, and each range test's
lr_find.png and lr_find.json (recommended/, stage-N/).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table
from transformers import PreTrainedModel

from tuneforge.artifacts import RECIPE_FILE, write_json_atomic
from tuneforge.config import Recipe, load_recipe, read_yaml
from tuneforge.errors import RecipeError
from tuneforge.models.adapters import adapter_scope
from tuneforge.models.groups import layer_groups
from tuneforge.strategies.advice import NEW_GROUPS, Recommendation, StageCheck, backbone_lr, check_stage, mean_lr, probe_fit, recommend
from tuneforge.strategies.freeze import build_plan
from tuneforge.strategies.optim import group_lrs
from tuneforge.strategies.schedules import make_multiplier
from tuneforge.tasks.registry import get_task
from tuneforge.training.assembly import load_data_and_model, training_length
from tuneforge.training.lr_find import find_lr
from tuneforge.training.probe import DataFacts, Probe, measure_data, probe_depths

RANGE_TEST_STEPS = 60
ADVICE_FILE = "advice.json"


@dataclass
class Advice:
    recommendation: Recommendation
    facts: DataFacts
    probe: Probe | None
    stages: list[StageCheck] = field(default_factory=list)  # the recipe's own plan, checked
    seconds: float = 0.0
    folder: Path | None = None

    def record(self) -> dict:
        """What metrics.jsonl and the model card keep of it."""
        rec = self.recommendation
        return {"type": "advice", "strategy": rec.strategy, "trainable_blocks": rec.trainable_blocks, "lr": rec.lr,
                "epochs": rec.epochs, "reasons": rec.reasons,
                "probe": None if self.probe is None else {"metric": self.probe.metric, "depths": self.probe.depths,
                                                          "scores": [round(s, 4) for s in self.probe.scores],
                                                          "head_input": round(self.probe.head_input, 4),
                                                          "baseline": round(self.probe.baseline, 4)},
                "seconds": round(self.seconds, 1)}


def advise(recipe: str | Path | dict | Recipe, overrides: list[str] | None = None, output_dir: str | Path | None = None,
           console: Console | None = None, range_test_steps: int = RANGE_TEST_STEPS) -> Advice:
    console = console or Console()
    started = time.perf_counter()
    recipe = load_recipe(recipe, overrides)
    if range_test_steps < 10:  # before minutes of probing, not after
        raise RecipeError([f"--range-test-steps {range_test_steps}: a range test needs at least 10 steps"])
    out = Path(output_dir) if output_dir else Path(f"{recipe.output_dir()}-advise")
    measured = recipe.model_copy(deep=True)
    if measured.model.freeze.strategy == "auto":  # measured as the full plan; the advice replaces it
        measured.model.freeze.strategy = "full"
    data, loaded = load_data_and_model(measured, console, main=True)
    task = get_task(recipe.task.type).for_run(measured, data, loaded.preprocessor)
    facts = measure_data(data, loaded, recipe.model.max_length, recipe.data.split_seed)
    batch = recipe.train.batch_size if isinstance(recipe.train.batch_size, int) else 32
    probe = probe_depths(task, data, loaded, recipe.eval.batch_size or 2 * batch, recipe.train.seed)
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    blocks = sum(1 for g in groups if g.name.startswith("block."))
    per_epoch, total = training_length(math.ceil(len(data.splits["train"]) / batch), recipe.train)
    no_probe = "no validation split to score a linear probe on (give data.validation or data.validation_fraction)" \
        if "validation" not in data.splits else "no linear probe for this task's targets"
    rec = recommend(len(data.splits["train"]), facts.smallest_class, probe, blocks, per_epoch, no_probe)
    quiet = Console(quiet=True)
    tested = range_test_lr(measured, rec.freeze(), out / "recommended", range_test_steps, quiet)
    if tested:
        rec.lr, capped = backbone_lr(round_lr(tested), rec.strategy, isinstance(loaded.model, PreTrainedModel))
        rec.reasons.append(f"learning rate {rec.lr:g}: " + (capped or f"a tenth of where the loss was lowest in a "
                                                                       f"{range_test_steps}-step range test of this plan"))
    else:
        rec.lr = recipe.optim.lr
        rec.reasons.append("learning rate: the recipe's (the range test found no falling loss)")
    advice = Advice(rec, facts, probe, folder=out)
    if recipe.model.freeze.strategy != "auto":
        plan = build_plan(recipe.model.freeze, groups, loaded.head_prefixes, per_epoch, total, adapter_scope(loaded))
        advice.stages = _check_plan(recipe, plan, groups, per_epoch, total, out, range_test_steps, quiet)
    advice.seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / ADVICE_FILE, {**advice.record(), "data": asdict(facts),
                                          "stages": [asdict(s) for s in advice.stages]})
    show(advice, recipe, console)
    return advice


def range_test_lr(recipe: Recipe, freeze: dict, out: Path, steps: int, console: Console) -> float | None:
    """The conservative LR of a short range test (a tenth of the LR at the lowest loss) for a freezing plan."""
    raw = recipe.model_dump(mode="json")
    raw["model"]["freeze"] = freeze
    return find_lr(raw, output_dir=out, steps=steps, console=console).conservative_suggestion


def _check_plan(recipe: Recipe, plan, groups, per_epoch: int, total: int, out: Path, steps: int,
                console: Console) -> list[StageCheck]:
    """Each stage of the recipe's plan: how long it lasts, the mean LR of every group it trains, and a range test
    of it (a progressive stage tested as a plan of its own)."""
    lrs = group_lrs(groups, recipe.optim)
    schedule = make_multiplier(recipe.optim.schedule, total)
    reference = next((name for name, lr in lrs.items() if lr == recipe.optim.lr and name == "head"),
                     next((name for name, lr in lrs.items() if lr == recipe.optim.lr), next(iter(lrs))))
    checks = []
    for index, stage in enumerate(plan.stages):
        end = plan.stages[index + 1].start_step if index + 1 < len(plan.stages) else total
        freeze = recipe.model.freeze.model_dump(mode="json")
        if recipe.model.freeze.strategy == "progressive":
            freeze = {**freeze, "stages": [{"steps": 1, "train": stage.selectors, "lr_multiplier": 1.0}]}
        trained = [g for g in stage.groups if g in lrs]
        check = StageCheck(index, stage.groups, end - stage.start_step, round((end - stage.start_step) / max(per_epoch, 1), 2),
                           {g: mean_lr(lrs[g], stage.lr_multiplier, schedule, stage.start_step, end) for g in trained},
                           reference if reference in trained else (trained[-1] if trained else reference))
        if trained and set(trained) <= set(NEW_GROUPS):  # a range test of pretrained blocks over-suggests: not used
            check.responds_at = range_test_lr(recipe, freeze, out / f"stage-{index}", steps, console)
        checks.append(check_stage(check, per_epoch))
    return checks


def round_lr(lr: float) -> float:
    """One significant figure: a range test is not more precise than that."""
    return float(f"{lr:.0e}")


def show(advice: Advice, recipe: Recipe, console: Console) -> None:
    facts, probe, rec = advice.facts, advice.probe, advice.recommendation
    classes = f", {len(facts.classes)} classes, smallest {facts.smallest_class}, imbalance {facts.imbalance:.1f}x" \
        if facts.classes else ""
    lengths = f"; tokens median {facts.tokens['median']}, 95th percentile {facts.tokens['p95']}, cut at " \
              f"{recipe.model.max_length}: {facts.tokens['cut_share']:.1%}" if facts.tokens else ""
    console.print(f"data: {facts.examples} training examples{classes}{lengths}")
    if probe is not None:
        table = Table(title=f"linear probes of the frozen features ({probe.train_examples} train, "
                            f"{probe.validation_examples} validation examples, {probe.seconds:.0f} s)")
        table.add_column("depth")
        table.add_column(probe.metric, justify="right")
        for depth, score in zip(probe.depths, probe.scores):
            table.add_row(depth, f"{score:.3f}")
        table.add_row("head input", f"{probe.head_input:.3f}")
        console.print(table)
        console.print(f"baseline {probe.baseline:.3f}; the head's input is {probe_fit(probe, probe.head_input):.0%} of "
                      "the way from it to perfect")
    blocks = f", the last {rec.trainable_blocks} blocks" if rec.trainable_blocks else ""
    console.print(f"[bold]advice:[/] model.freeze.strategy {rec.strategy}{blocks}, optim.lr {rec.lr:g}, "
                  f"train.epochs {rec.epochs}")
    for reason in rec.reasons:
        console.print(f"  - {reason}", soft_wrap=True)
    for check in advice.stages:
        verdict = "; ".join(check.problems) or "fine"
        console.print(f"recipe's stage {check.index} ({', '.join(check.groups)}; {check.steps} steps): {verdict}",
                      soft_wrap=True)
    console.print(f"advice written to {advice.folder / ADVICE_FILE} ({advice.seconds:.0f} s)")


def resolve_auto(recipe: Recipe, run_dir: Path, resume: bool, console: Console) -> tuple[Recipe, Advice | None]:
    """A recipe with `strategy: auto` made concrete: the advice's strategy, depth, learning rate and epochs (a head
    alone wants a far higher rate than a whole backbone: they are chosen together). A resumed run takes what its
    first attempt chose."""
    if recipe.model.freeze.strategy != "auto":
        return recipe, None
    raw = recipe.model_dump(mode="json")
    saved = run_dir / RECIPE_FILE
    if resume and saved.is_file():
        chosen = read_yaml(saved)
        raw["model"]["freeze"], raw["optim"]["lr"], raw["train"]["epochs"] = (
            chosen["model"]["freeze"], chosen["optim"]["lr"], chosen["train"]["epochs"])
        return load_recipe(raw), None
    with tempfile.TemporaryDirectory(prefix="tuneforge-advise-") as scratch:  # the run keeps the advice as a record
        advice = advise(recipe, output_dir=scratch, console=console)
    rec = advice.recommendation
    raw["model"]["freeze"] = {**raw["model"]["freeze"], "strategy": rec.strategy, "trainable_blocks": rec.trainable_blocks}
    raw["optim"]["lr"], raw["train"]["epochs"] = rec.lr, rec.epochs  # a strategy's LR and length go with it
    try:
        return load_recipe(raw), advice
    except RecipeError as error:
        raise RecipeError([f"model.freeze.strategy auto chose {rec.strategy}, which this recipe refuses: {p}"
                           for p in error.problems]) from None
