"""Advice as data: from measured figures (the data, linear probes of the frozen features, learning-rate range
tests) to a freezing strategy, depth, learning rate and length, each choice with its reason in plain words; and
the checks of a recipe's own plan, stage by stage. The measuring is tuning/advise.py's; the rules are here, and
docs/strategies.md says what they were checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FEW_EXAMPLES, FEW_PER_CLASS = 100, 10  # below either, a backbone is not moved at all
FEATURES_FIT = 0.85  # share of the error above the majority (or of the variance) a frozen linear probe removes
DEPTH_PEAK = 0.01  # the probe falling by this much after its best depth (and by more than its noise): retrain after it
BACKBONE_LR_CAP = 1e-4  # range tests of pretrained transformer blocks point at LRs a whole run does not survive
NEW_GROUPS = ("head",)  # groups a run creates: the only ones a range test's LR is compared against
TARGET_STEPS = 500  # optimizer steps a fine-tuning run of the backbone aims for (head only: twice as many)
SHORT_STAGE = 20  # a stage shorter than this many steps (or half an epoch) is flagged
TINY_LR = 1e-6  # a trained group whose mean learning rate is below this barely moves


@dataclass
class Recommendation:
    strategy: str  # full, partial or head_only
    trainable_blocks: int | None
    epochs: int
    lr: float | None = None  # from the range test of the recommended plan (None until measured)
    reasons: list[str] = field(default_factory=list)

    def freeze(self) -> dict:
        return {"strategy": self.strategy, **({"trainable_blocks": self.trainable_blocks} if self.trainable_blocks else {})}


def recommend(examples: int, smallest_class: int | None, probe, blocks: int, updates_per_epoch: int,
              no_probe: str = "no linear probe for this task") -> Recommendation:
    """The freezing strategy and length the measured figures call for (the LR comes from a range test)."""
    head_epochs = epochs_for(2 * TARGET_STEPS, updates_per_epoch, 3, 30)
    if examples < FEW_EXAMPLES or (smallest_class is not None and smallest_class < FEW_PER_CLASS):
        few = f"{examples} training examples" + (f", {smallest_class} in the smallest class" if smallest_class is not None else "")
        return Recommendation("head_only", None, head_epochs, reasons=[
            f"{few}: too few to move the backbone without losing what it knows; the new head alone"])
    if probe is None:
        return Recommendation("full", None, epochs_for(TARGET_STEPS, updates_per_epoch, 2, 10), reasons=[
            f"{examples} training examples and {no_probe}: full fine-tuning, the safe default"])
    fit = probe_fit(probe, probe.head_input)
    majority = f" (majority {probe.baseline:.3f})" if probe.metric == "accuracy" else ""
    figures = f"a linear probe of what the new head reads from the frozen model: {probe.metric} {probe.head_input:.3f}{majority}"
    if fit >= FEATURES_FIT:
        return Recommendation("head_only", None, head_epochs, reasons=[
            f"{figures}, {fit:.0%} of the way from the baseline to perfect: the features fit; training only the "
            "head keeps them and costs a fraction (the feature cache computes the backbone once)"])
    peak = probe.best_depth
    full_epochs = epochs_for(TARGET_STEPS, updates_per_epoch, 2, 10)
    if peak < blocks - 1 and max(probe.scores) - probe.last >= max(DEPTH_PEAK, 2 * probe_noise(probe)):
        retrain = blocks - 1 - peak
        return Recommendation("partial", retrain, full_epochs, reasons=[
            f"{figures}, {fit:.0%} of the way from the baseline to perfect: not enough for the head alone; probes "
            f"of each block peak at {probe.depths[peak]} ({probe.scores[peak]:.3f}) and fall after it to "
            f"{probe.last:.3f}: the {retrain} block(s) above it suit this task least and are retrained, the rest stay"])
    return Recommendation("full", None, full_epochs, reasons=[
        f"{figures}, {fit:.0%} of the way from the baseline to perfect, and no block's features do clearly better "
        f"(best {max(probe.scores):.3f}): the whole backbone adapts (full fine-tuning)"])


def probe_noise(probe) -> float:
    """The standard error of an accuracy on the probe's validation sample: a fall smaller than two of them is not
    told apart from chance (on 500 SST-2 sentences a 1.4-point fall was not, and full fine-tuning beat
    retraining the blocks after the peak). A number's R² gets the fixed threshold only."""
    if probe.metric != "accuracy" or probe.validation_examples < 1:
        return 0.0
    best = max(probe.scores)
    return math.sqrt(best * (1 - best) / probe.validation_examples)


def backbone_lr(tested: float, strategy: str, transformer: bool) -> tuple[float, str | None]:
    """The range test's LR, capped for plans that train pretrained transformer blocks: their loss over a few dozen
    steps keeps falling at LRs that unsettle them over a whole run (SMS spam: full fine-tuning of MiniLM at the
    range test's 1e-2 stayed at the majority class, at 1e-4 it reached 0.99). A CNN's range test is a good guide
    (hymenoptera with ResNet-20: full at its 2e-3 reached 0.72, at 1e-4 0.58), so it is not capped."""
    if transformer and strategy != "head_only" and tested > BACKBONE_LR_CAP:
        return BACKBONE_LR_CAP, (f"the range test's {tested:.1g}, capped: this plan trains pretrained blocks, and a "
                                 "short range test of transformer blocks points higher than a whole run tolerates")
    return tested, None


def probe_fit(probe, score: float) -> float:
    """How much of what is left above the baseline a probe's score explains (1: all of it)."""
    if probe.metric == "r2":
        return max(score, 0.0)
    return max(score - probe.baseline, 0.0) / max(1 - probe.baseline, 1e-9)


def epochs_for(steps: int, per_epoch: int, low: int, high: int) -> int:
    return int(min(max(math.ceil(steps / max(per_epoch, 1)), low), high))


@dataclass
class StageCheck:
    """One stage of a recipe's plan as it will train."""

    index: int
    groups: list[str]
    steps: int
    epochs: float
    lrs: dict[str, float]  # trained group -> mean learning rate over the stage (group LR x stage x schedule)
    reference: str  # the group whose LR is optim.lr (the range test's)
    responds_at: float | None = None  # the range test's conservative LR for this stage's reference group
    problems: list[str] = field(default_factory=list)


def check_stage(check: StageCheck, updates_per_epoch: int) -> StageCheck:
    """What makes this stage unable to do its part: too short, learning rates far below what the loss responds
    to in a range test, groups that barely move."""
    if check.steps < min(SHORT_STAGE, max(updates_per_epoch // 2, 1)) or check.steps == 0:
        check.problems.append(f"stage {check.index} lasts {check.steps} steps ({check.epochs:.2f} epochs): too short "
                              "for what it trains to settle")
    reference_lr = check.lrs.get(check.reference)
    if check.responds_at and set(check.lrs) <= set(NEW_GROUPS) and reference_lr is not None and reference_lr < check.responds_at / 10:
        check.problems.append(f"stage {check.index} trains {check.reference} at a mean LR of {reference_lr:.2g}, "
                              f"{check.responds_at / reference_lr:.0f}x below {check.responds_at:.2g}, where a range "
                              "test of this stage finds its loss falling")
    slow = sorted((lr, group) for group, lr in check.lrs.items() if lr < TINY_LR)
    if slow:
        shown = ", ".join(f"{group} {lr:.1g}" for lr, group in slow[:3]) + (f" (+{len(slow) - 3})" if len(slow) > 3 else "")
        check.problems.append(f"stage {check.index}: {len(slow)} group(s) train at mean LRs under {TINY_LR:g} and "
                              f"barely move ({shown}): layer decay, the stage's multiplier and the schedule's decay "
                              "multiply down to that")
    return check


def mean_lr(lr: float, multiplier: float, schedule, start: int, end: int) -> float:
    """The mean learning rate of a group over steps [start, end): its LR x the stage's multiplier x the schedule."""
    if end <= start:
        return 0.0
    return lr * multiplier * sum(schedule(step) for step in range(start, end)) / (end - start)
