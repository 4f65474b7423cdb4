"""Learning-rate schedules: each multiplier checked against a closed form written out here with math.

Most cases use total_steps=110 with warmup_steps=10, so after warmup the schedule
runs on t = step - 10 over a horizon of T = 100 steps.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import BaseModel, ValidationError

from tuneforge.strategies.schedules import PlateauState, ScheduleSpec, lr_multiplier, make_multiplier, refresh_lr, warmup_steps_for

TOTAL, WARMUP = 110, 10
ALL_NAMES = ["constant", "linear", "cosine", "exponential", "step", "multistep", "one_cycle", "cyclic", "plateau"]
# The smallest settings each schedule accepts.
MINIMAL = {"exponential": {"decay_steps": 20}, "step": {"step_size": 30}, "multistep": {"milestones": [20, 50]},
           "cyclic": {"cycle_steps": 40}}
ONE_CYCLE_END = 1 / 25 / 1e4  # 1 / (div_factor * final_div_factor) with the defaults


def cos_between(start, end, progress):
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


# (settings, {step: expected multiplier}) with warmup_steps=10, total_steps=110.
# Steps: 0, mid-warmup, end of warmup, two later steps, last step taken (109), end (110), beyond.
CLOSED_FORMS = {
    "constant": ({}, {0: 0.0, 5: 0.5, 10: 1.0, 35: 1.0, 60: 1.0, 109: 1.0, 110: 1.0, 150: 1.0}),
    "linear": ({}, {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.75, 60: 0.5, 109: 0.01, 110: 0.0, 150: 0.0}),
    "linear_floor": ({"name": "linear", "min_lr_ratio": 0.2},
                     {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.2 + 0.8 * 0.75, 60: 0.6, 109: 0.2 + 0.8 * 0.01,
                      110: 0.2, 150: 0.2}),
    "cosine": ({}, {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.5 * (1 + math.cos(math.pi / 4)), 60: 0.5,
                    109: 0.5 * (1 + math.cos(math.pi * 0.99)), 110: 0.0, 150: 0.0}),
    "cosine_floor": ({"name": "cosine", "min_lr_ratio": 0.1},
                     {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 60: 0.55,
                      109: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.99)), 110: 0.1, 150: 0.1}),
    "exponential": ({"decay_steps": 20, "decay_rate": 0.5},
                    {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.5 ** 1.25, 60: 0.5 ** 2.5, 109: 0.5 ** 4.95,
                     110: 0.5 ** 5, 150: 0.5 ** 7}),
    "exponential_staircase": ({"name": "exponential", "decay_steps": 20, "decay_rate": 0.5, "staircase": True},
                              {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.5, 60: 0.25, 109: 0.5 ** 4, 110: 0.5 ** 5,
                               150: 0.5 ** 7}),
    "step": ({"step_size": 30, "gamma": 0.5},
             {0: 0.0, 5: 0.5, 10: 1.0, 35: 1.0, 60: 0.5, 109: 0.125, 110: 0.125, 150: 0.0625}),
    "multistep": ({"milestones": [20, 50, 80], "gamma": 0.1},
                  {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.1, 60: 0.01, 109: 0.001, 110: 0.001, 150: 0.001}),
    # OneCycleLR indexing: peak at t = 0.3*100 - 1 = 29 (step 39), floor at t = 99 (step 109).
    "one_cycle": ({}, {0: 0.0, 5: 0.5, 10: 1 / 25, 35: cos_between(1 / 25, 1.0, 25 / 29), 39: 1.0,
                       60: cos_between(1.0, ONE_CYCLE_END, 21 / 70), 109: ONE_CYCLE_END, 110: ONE_CYCLE_END,
                       150: ONE_CYCLE_END}),
    "cyclic": ({"cycle_steps": 40, "base_ratio": 0.2},
               {0: 0.0, 5: 0.5, 10: 0.2, 20: 0.6, 30: 1.0, 35: 0.8, 50: 0.2, 60: 0.6, 109: 0.2 + 0.8 * 2 * 19 / 40,
                110: 1.0, 150: 1.0}),
    "plateau": ({}, {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 110: 1.0, 150: 1.0}),
}


@pytest.mark.parametrize("case", CLOSED_FORMS)
def test_multiplier_matches_closed_form(case):
    settings, expected = CLOSED_FORMS[case]
    spec = ScheduleSpec(**{"name": case, **settings, "warmup_steps": WARMUP})
    for step, value in expected.items():
        assert lr_multiplier(step, spec=spec, total_steps=TOTAL) == pytest.approx(value, rel=1e-12, abs=1e-15), step


@pytest.mark.parametrize("name", ALL_NAMES)
def test_warmup_composes_with_every_schedule(name):
    """Linear ramp step/warmup, then the schedule exactly as if it started at step 0 with T = total - warmup."""
    warmed = ScheduleSpec(name=name, warmup_steps=WARMUP, **MINIMAL.get(name, {}))
    bare = ScheduleSpec(name=name, **MINIMAL.get(name, {}))
    for step in range(WARMUP):
        assert lr_multiplier(step, spec=warmed, total_steps=TOTAL) == step / WARMUP
    for step in range(WARMUP, TOTAL + 20):
        assert (lr_multiplier(step, spec=warmed, total_steps=TOTAL)
                == lr_multiplier(step - WARMUP, spec=bare, total_steps=TOTAL - WARMUP)), step


def test_warmup_ratio_and_warmup_steps_precedence():
    assert warmup_steps_for(ScheduleSpec(warmup_ratio=0.25), 110) == 27  # int() truncates 27.5
    assert warmup_steps_for(ScheduleSpec(warmup_ratio=0.25, warmup_steps=4), 110) == 4
    assert warmup_steps_for(ScheduleSpec(), 110) == 0
    spec = ScheduleSpec(name="linear", warmup_ratio=0.25)
    assert lr_multiplier(9, spec=spec, total_steps=110) == 9 / 27
    assert lr_multiplier(27 + 83 // 2, spec=spec, total_steps=110) == pytest.approx(1 - 41 / 83)


def test_zero_total_steps_does_not_divide_by_zero():
    # epochs: 0 runs build the scheduler (LambdaLR calls the function at step 0) without training.
    for name in ALL_NAMES:
        assert lr_multiplier(0, spec=ScheduleSpec(name=name, **MINIMAL.get(name, {})), total_steps=0) > 0


# Independent closed forms over every step, for driving a real optimizer.
def cosine_with_warmup(step):  # warmup 10, T = 50, floor 0.1
    if step < 10:
        return step / 10
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min((step - 10) / 50, 1)))


OPTIMIZER_CASES = {
    "cosine": ({"name": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1}, cosine_with_warmup),
    "exponential_staircase": ({"name": "exponential", "decay_steps": 7, "decay_rate": 0.8, "staircase": True},
                              lambda step: 0.8 ** (step // 7)),
    "multistep": ({"name": "multistep", "milestones": [15, 40], "gamma": 0.3, "warmup_steps": 5},
                  lambda step: step / 5 if step < 5 else 0.3 ** ((step - 5 >= 15) + (step - 5 >= 40))),
    "cyclic": ({"name": "cyclic", "cycle_steps": 12, "base_ratio": 0.25},
               lambda step: 0.25 + 0.75 * (1 - abs(2 * (step % 12) / 12 - 1))),
}


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_lambda_lr_drives_both_param_groups(case):
    settings, closed_form = OPTIMIZER_CASES[case]
    total = 60
    weights, biases = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([{"params": [weights], "lr": 1e-3}, {"params": [biases], "lr": 1e-5}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_multiplier(ScheduleSpec(**settings), total))
    for k in range(total + 5):
        # After k optimizer steps LambdaLR has applied the multiplier for step k.
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * closed_form(k), rel=1e-12, abs=1e-18), k
        assert optimizer.param_groups[1]["lr"] == pytest.approx(1e-5 * closed_form(k), rel=1e-12, abs=1e-20), k
        (weights.sum() + biases.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def test_lambda_lr_state_is_json_and_resumes_exactly():
    """checkpoint.py writes scheduler.state_dict() into state.json; a reloaded run continues on the same LRs."""
    spec = ScheduleSpec(name="cosine", warmup_steps=4)

    def build():
        param = torch.nn.Parameter(torch.ones(2))
        optimizer = torch.optim.AdamW([param], lr=1e-3)
        return param, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, make_multiplier(spec, 30))

    def advance(param, optimizer, scheduler, steps):
        lrs = []
        for _ in range(steps):
            param.sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            lrs.append(optimizer.param_groups[0]["lr"])
        return lrs

    run = build()
    uninterrupted = advance(*run, 20)
    first = build()
    advance(*first, 8)
    saved = json.loads(json.dumps(first[2].state_dict()))
    optimizer_state = first[1].state_dict()
    resumed = build()
    resumed[1].load_state_dict(optimizer_state)
    resumed[2].load_state_dict(saved)
    assert advance(*resumed, 12) == uninterrupted[8:]


def test_multiplier_is_pure():
    multiplier = make_multiplier(ScheduleSpec(name="one_cycle", warmup_ratio=0.1), 200)
    forward = [multiplier(step) for step in range(201)]
    assert [multiplier(step) for step in reversed(range(201))] == forward[::-1]


@pytest.mark.parametrize("total, pct_start, div_factor, final_div_factor",
                         [(100, 0.3, 25.0, 1e4), (37, 0.25, 10.0, 100.0), (8, 0.5, 4.0, 1e3), (1000, 0.1, 25.0, 1e4)])
def test_one_cycle_matches_torch(total, pct_start, div_factor, final_div_factor):
    """Same LR as OneCycleLR (anneal_strategy='cos', max_lr = base LR) at every step an update uses (0..T-1).

    At step T (after the last update, never used) OneCycleLR evaluates its cosine
    past the end and rises slightly above the floor; lr_multiplier holds the floor.
    """
    spec = ScheduleSpec(name="one_cycle", pct_start=pct_start, div_factor=div_factor, final_div_factor=final_div_factor)
    bases = [1e-3, 1e-5]

    def optimizer():
        return torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.ones(2))], "lr": lr} for lr in bases])

    ours_optimizer, torch_optimizer = optimizer(), optimizer()
    ours = torch.optim.lr_scheduler.LambdaLR(ours_optimizer, make_multiplier(spec, total))
    reference = torch.optim.lr_scheduler.OneCycleLR(
        torch_optimizer, max_lr=bases, total_steps=total, pct_start=pct_start, anneal_strategy="cos",
        div_factor=div_factor, final_div_factor=final_div_factor, cycle_momentum=False)
    for step in range(total):
        for our_group, torch_group in zip(ours_optimizer.param_groups, torch_optimizer.param_groups):
            assert our_group["lr"] == pytest.approx(torch_group["lr"], rel=1e-9), step
        ours_optimizer.step()
        torch_optimizer.step()
        ours.step()
        reference.step()
    floor = 1 / (div_factor * final_div_factor)
    assert ours_optimizer.param_groups[0]["lr"] == pytest.approx(bases[0] * floor, rel=1e-12)


def test_one_cycle_peak_and_floor_follow_torch_indexing():
    spec = ScheduleSpec(name="one_cycle")
    assert lr_multiplier(0, spec=spec, total_steps=100) == pytest.approx(1 / 25)
    assert lr_multiplier(29, spec=spec, total_steps=100) == pytest.approx(1.0)  # pct_start*T - 1, not 30
    assert lr_multiplier(30, spec=spec, total_steps=100) < 1.0
    assert lr_multiplier(99, spec=spec, total_steps=100) == pytest.approx(ONE_CYCLE_END)  # T - 1, not T


def test_exponential_staircase_versus_smooth():
    smooth = ScheduleSpec(name="exponential", decay_steps=10, decay_rate=0.9)
    staircase = smooth.model_copy(update={"staircase": True})
    expected = {0: (1.0, 1.0), 5: (0.9 ** 0.5, 1.0), 9: (0.9 ** 0.9, 1.0), 10: (0.9, 0.9),
                19: (0.9 ** 1.9, 0.9), 20: (0.81, 0.81), 25: (0.9 ** 2.5, 0.81)}
    for step, (smooth_value, staircase_value) in expected.items():
        assert lr_multiplier(step, spec=smooth, total_steps=1000) == pytest.approx(smooth_value, rel=1e-12)
        assert lr_multiplier(step, spec=staircase, total_steps=1000) == pytest.approx(staircase_value, rel=1e-12)


def test_exponential_default_decay_rate():
    spec = ScheduleSpec(name="exponential", decay_steps=100)
    assert lr_multiplier(250, spec=spec, total_steps=1000) == pytest.approx(0.96 ** 2.5, rel=1e-12)


def test_multistep_at_and_around_milestones():
    spec = ScheduleSpec(name="multistep", milestones=[3, 7], gamma=0.5)
    expected = {0: 1.0, 2: 1.0, 3: 0.5, 4: 0.5, 6: 0.5, 7: 0.25, 8: 0.25, 1000: 0.25}
    assert {step: lr_multiplier(step, spec=spec, total_steps=10) for step in expected} == expected


def test_step_schedule_boundaries():
    spec = ScheduleSpec(name="step", step_size=4, gamma=0.5)
    expected = {0: 1.0, 3: 1.0, 4: 0.5, 7: 0.5, 8: 0.25, 12: 0.125}
    assert {step: lr_multiplier(step, spec=spec, total_steps=10) for step in expected} == expected


def test_cyclic_quarter_half_full_cycles():
    spec = ScheduleSpec(name="cyclic", cycle_steps=8, base_ratio=0.25)
    expected = {0: 0.25, 1: 0.4375, 2: 0.625, 4: 1.0, 6: 0.625, 8: 0.25, 10: 0.625, 12: 1.0, 16: 0.25}
    assert {step: lr_multiplier(step, spec=spec, total_steps=100) for step in expected} == expected


def run_plateau(spec, mode, metrics):
    """Indices (0-based) of the evaluations that reduced the LR, and the multiplier after each."""
    state = PlateauState(spec, mode)
    reductions, multipliers = [], []
    for index, metric in enumerate(metrics):
        if state.update(metric):
            reductions.append(index)
        multipliers.append(state.multiplier)
    return reductions, multipliers


def test_plateau_mode_max():
    spec = ScheduleSpec(name="plateau", patience=2, factor=0.5)
    metrics = [0.5, 0.6, 0.6, 0.59, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    reductions, multipliers = run_plateau(spec, "max", metrics)
    # Evaluation 4 is the third in a row without improvement (> patience=2); the counter restarts after it.
    assert reductions == [4, 8]
    assert multipliers == [1.0] * 4 + [0.5] * 4 + [0.25] * 3


def test_plateau_mode_min():
    spec = ScheduleSpec(name="plateau", patience=0, factor=0.1)
    reductions, multipliers = run_plateau(spec, "min", [1.0, 0.9, 0.95, 0.8, 0.8, 0.7])
    assert reductions == [2, 4]
    assert multipliers == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_plateau_threshold_is_relative():
    spec = ScheduleSpec(name="plateau", patience=0, factor=0.5, threshold=0.1)
    # max: beating best=1.0 needs > 1.1; then beating 1.2 needs > 1.32.
    assert run_plateau(spec, "max", [1.0, 1.05, 1.2, 1.3, 1.33])[0] == [1, 3]
    # min: beating best=1.0 needs < 0.9.
    assert run_plateau(spec, "min", [1.0, 0.95, 0.85])[0] == [1]
    # Negative metrics: the margin is on |best|, so in max mode -9.5 does not beat -10 by 10% but -8.9 does.
    assert run_plateau(spec, "max", [-10.0, -9.5, -8.9, -8.9])[0] == [1, 3]
    assert run_plateau(spec, "min", [-10.0, -10.5, -11.5])[0] == [1]


def test_plateau_does_not_update_best_on_small_gains():
    state = PlateauState(ScheduleSpec(name="plateau", patience=5, threshold=0.1), "max")
    for metric in (1.0, 1.05, 1.09):
        state.update(metric)
    assert state.best == 1.0 and state.bad_evaluations == 2


def test_plateau_nan_counts_as_no_improvement():
    state = PlateauState(ScheduleSpec(name="plateau", patience=0), "min")
    assert state.update(float("nan")) is True
    assert state.best is None
    state.update(1.0)
    assert state.best == 1.0


def test_plateau_min_ratio_floor():
    spec = ScheduleSpec(name="plateau", patience=0, factor=0.1, min_ratio=0.05)
    reductions, multipliers = run_plateau(spec, "min", [1.0, 1.0, 1.0, 1.0, 1.0])
    assert reductions == [1, 2]  # 1 -> 0.1 -> 0.05, then already at the floor
    assert multipliers == pytest.approx([1.0, 0.1, 0.05, 0.05, 0.05])


def test_plateau_state_round_trips_through_json():
    spec = ScheduleSpec(name="plateau", patience=1, factor=0.5)
    metrics = [0.3, 0.5, 0.4, 0.45, 0.6, 0.6, 0.55, 0.61, 0.6, 0.6, 0.6]
    uninterrupted = PlateauState(spec, "max")
    full = [(uninterrupted.update(metric), uninterrupted.multiplier) for metric in metrics]

    first = PlateauState(spec, "max")
    for metric in metrics[:6]:  # stops mid-streak: one bad evaluation pending
        first.update(metric)
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = PlateauState(spec, "max")
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == first.state_dict()
    assert [(resumed.update(metric), resumed.multiplier) for metric in metrics[6:]] == full[6:]
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_plateau_state_fresh_is_json_and_checks_mode():
    state = PlateauState(ScheduleSpec(name="plateau"), "min")
    assert json.loads(json.dumps(state.state_dict())) == {"mode": "min", "best": None, "bad_evaluations": 0,
                                                           "multiplier": 1.0}
    with pytest.raises(ValueError, match="mode"):
        PlateauState(ScheduleSpec(name="plateau"), "max").load_state_dict(state.state_dict())
    with pytest.raises(ValueError, match="mode"):
        PlateauState(ScheduleSpec(name="plateau"), "maximum")


def test_plateau_multiplier_scales_warmup():
    spec = ScheduleSpec(name="plateau", warmup_steps=10)
    plateau = PlateauState(spec, "max")
    plateau.multiplier = 0.5
    assert lr_multiplier(4, spec=spec, total_steps=100, plateau=plateau) == 0.2
    assert lr_multiplier(50, spec=spec, total_steps=100, plateau=plateau) == 0.5
    assert lr_multiplier(50, spec=spec, total_steps=100) == 1.0


def test_plateau_through_lambda_lr_and_refresh():
    spec = ScheduleSpec(name="plateau", patience=0, factor=0.5)
    plateau = PlateauState(spec, "min")
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_multiplier(spec, 100, plateau))
    for _ in range(3):
        param.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    plateau.update(1.0)
    assert plateau.update(2.0) is True
    assert optimizer.param_groups[0]["lr"] == 1e-3  # LambdaLR only recomputes inside step()
    refresh_lr(scheduler)
    assert optimizer.param_groups[0]["lr"] == 5e-4
    assert scheduler.last_epoch == 3  # refreshing does not advance the schedule
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 5e-4


def assert_invalid(settings, field):
    with pytest.raises(ValidationError) as error:
        ScheduleSpec.model_validate(settings)
    assert field in str(error.value)


def test_unknown_key_is_rejected():
    assert_invalid({"name": "cosine", "warmpu_steps": 5}, "warmpu_steps")


@pytest.mark.parametrize("name, field", [("exponential", "decay_steps"), ("step", "step_size"),
                                         ("multistep", "milestones"), ("cyclic", "cycle_steps")])
def test_schedule_without_its_required_setting_is_rejected(name, field):
    assert_invalid({"name": name}, field)
    assert_invalid(name, field)  # the bare-string shorthand too


@pytest.mark.parametrize("milestones", [[5, 5], [10, 3], [0, 4], [-1]])
def test_bad_milestones_are_rejected(milestones):
    assert_invalid({"name": "multistep", "milestones": milestones}, "milestones")


def test_empty_milestones_are_rejected_for_multistep():
    assert_invalid({"name": "multistep", "milestones": []}, "milestones")


@pytest.mark.parametrize("settings, field", [
    ({"warmup_ratio": 1.5}, "warmup_ratio"), ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"warmup_steps": -1}, "warmup_steps"), ({"name": "cosin"}, "name"),
    ({"name": "exponential", "decay_steps": 10, "decay_rate": 1.5}, "decay_rate"),
    ({"name": "exponential", "decay_steps": 0}, "decay_steps"),
    ({"name": "plateau", "factor": 1.0}, "factor"), ({"name": "one_cycle", "pct_start": 1.0}, "pct_start"),
])
def test_out_of_range_settings_are_rejected(settings, field):
    assert_invalid(settings, field)


def test_bare_string_shorthand():
    assert ScheduleSpec.model_validate("cosine") == ScheduleSpec(name="cosine")

    class Optim(BaseModel):
        schedule: ScheduleSpec = ScheduleSpec()

    assert Optim.model_validate({"schedule": "one_cycle"}).schedule.name == "one_cycle"
    assert Optim.model_validate({"schedule": {"name": "step", "step_size": 3}}).schedule.step_size == 3
    assert Optim().schedule.name == "linear"
