"""What a study found, written into its folder: trials.csv, best-recipe.yaml (a plain recipe that reproduces the
best trial with `tuneforge train`), the best trial's test metrics (the test split's only use), plots as PNG
and one self-contained study.html, and summary.json."""

from __future__ import annotations

import base64
import html
import io
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
import yaml
from rich.console import Console

from tuneforge.artifacts import MODEL_DIR, write_json_atomic, write_text_atomic
from tuneforge.config import DataSpec, Recipe, load_recipe
from tuneforge.data.common import read_task_data
from tuneforge.errors import TuneforgeError
from tuneforge.strategies.search import trial_recipe
from tuneforge.tuning.live import short_values, trial_value
from tuneforge.tuning.trial import trial_dir
from tuneforge.use.predictor import load_saved

BEST_RECIPE, TRIALS_CSV, SUMMARY, PAGE, PLOTS_DIR = "best-recipe.yaml", "trials.csv", "summary.json", "study.html", "plots"


@dataclass
class StudySummary:
    study_dir: Path
    study_name: str
    metric: str
    states: dict  # state -> how many trials
    best_trial: int | None = None
    best_value: float | None = None  # validation, the selection metric
    best_values: dict = field(default_factory=dict)  # the best trial's searched values
    as_written_value: float | None = None  # validation of the recipe as written (trial 0)
    advice_trial: int | None = None  # the trial of what `tuneforge advise` recommends, when there is one
    advice_value: float | None = None
    best_recipe: Path | None = None
    test: dict | None = None  # the best trial's metrics on the test split, measured once
    plots: list[str] = field(default_factory=list)


def write_report(study: optuna.Study, recipe: Recipe, written: dict, space: dict, study_dir: Path,
                 console: Console) -> StudySummary:
    """`written`: the recipe as the user wrote it (overrides applied), the base of best-recipe.yaml."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a worker that died: its trial is failed (and queued again)
    trials = study.get_trials(deepcopy=False)
    metric = recipe.eval.metric
    summary = StudySummary(study_dir, study.study_name, metric, _states(trials))
    write_text_atomic(study_dir / TRIALS_CSV, study.trials_dataframe().to_csv(index=False))
    as_written = [t for t in trials if t.user_attrs.get("as_written") and t.state == optuna.trial.TrialState.COMPLETE]
    summary.as_written_value = as_written[0].values[0] if as_written else None
    advised = [t for t in trials if t.user_attrs.get("advice") and t.state == optuna.trial.TrialState.COMPLETE]
    summary.advice_trial = advised[0].number if advised else None
    summary.advice_value = advised[0].values[0] if advised else None
    best = best_trial(study)
    if best is not None:
        summary.best_trial, summary.best_value = best.number, best.values[0]
        summary.best_values = best.user_attrs.get("values", {})
        summary.best_recipe = _write_best_recipe(recipe, written, best, study, study_dir, space)
        summary.test = _test_once(study, best, summary.best_recipe, study_dir)
    summary.plots = _plots(study, metric, study_dir / PLOTS_DIR)
    write_json_atomic(study_dir / SUMMARY, {**asdict(summary), "study_dir": str(study_dir),
                                            "best_recipe": str(summary.best_recipe) if summary.best_recipe else None})
    write_text_atomic(study_dir / PAGE, _page(summary, trials, study_dir / PLOTS_DIR))
    _print(summary, console)
    return summary


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The complete trial with the best validation metric (with several objectives, the first decides)."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        return None
    maximise = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return (max if maximise else min)(done, key=lambda t: (t.values[0], -t.number) if maximise else (t.values[0], t.number))


def _states(trials: list) -> dict:
    return dict(Counter(trial.state.name.lower() for trial in trials))


def _write_best_recipe(recipe: Recipe, written: dict, best: optuna.trial.FrozenTrial, study: optuna.Study,
                       study_dir: Path, space: dict) -> Path:
    """The recipe as written with the best trial's values: short, ${VAR}s kept. Should it not resolve to the very
    recipe the trial trained (it always should), the trial's resolved recipe is written instead."""
    values = {key: value for key, value in best.user_attrs.get("values", {}).items() if key in space}
    trained = load_recipe(trial_recipe(recipe.model_dump(mode="json"), values)).model_dump(mode="json", exclude={"output"})
    raw = trial_recipe(written, values)
    try:
        same = load_recipe(raw).model_dump(mode="json", exclude={"output"}) == trained
    except TuneforgeError:
        same = False
    if not same:
        raw = trial_recipe(recipe.model_dump(mode="json"), values)
    header = (f"# The best of {len(study.trials)} trials of study {study.study_name} (trial {best.number}, validation "
              f"{recipe.eval.metric} {best.values[0]:.4f}).\n# Reproduce it: tuneforge train {study_dir / BEST_RECIPE}\n")
    path = study_dir / BEST_RECIPE
    write_text_atomic(path, header + yaml.safe_dump(raw, sort_keys=False))
    return path


def _test_once(study: optuna.Study, best: optuna.trial.FrozenTrial, best_recipe: Path, study_dir: Path) -> dict | None:
    """The best trial's model on the test split. Measured once per best trial and kept in the study, so a
    continued study never looks at the test split to choose."""
    key = f"test_of_trial_{best.number}"
    if key in study.user_attrs:
        return study.user_attrs[key]
    folder = trial_dir(study_dir, best.number) / MODEL_DIR
    if not folder.is_dir():  # trained by a worker on another machine: its folder is there
        return None
    metrics = evaluate_split(load_recipe(best_recipe), folder, "test")
    if metrics is not None:
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
        study.set_user_attr(key, metrics)
    return metrics


def evaluate_split(recipe: Recipe, model_dir: Path, split: str) -> dict | None:
    """A saved model's metrics on one split of the recipe's data, read exactly as training read it."""
    info, loaded, task = load_saved(model_dir)
    data = read_task_data(recipe.data, type(task), recipe.task)
    if split not in data.splits:
        return None
    chosen = data.splits[split]
    targets = type(task).encode_targets(chosen.labels, info.label_values, DataSpec(**info.data))
    return task.evaluate(*task.file_loader(loaded, task.dataset(chosen, targets, loaded.preprocessor)))


def _plots(study: optuna.Study, metric: str, folder: Path) -> list[str]:
    """Optimisation history, parameter importances and parallel coordinates as PNG (those the trials allow)."""
    import matplotlib  # noqa: PLC0415  (a plotting backend only when a report is drawn)

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots  # noqa: PLC0415

    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    drawn = []
    folder.mkdir(parents=True, exist_ok=True)
    for name, draw in (("history", plots.plot_optimization_history), ("importances", plots.plot_param_importances),
                       ("parallel", plots.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
                axes = draw(study, target=target, target_name=metric)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError):  # too few trials for this plot
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(9, 5)
        figure.savefig(folder / f"{name}.png", dpi=90, bbox_inches="tight")
        matplotlib.pyplot.close(figure)
        drawn.append(name)
    return drawn


def _page(summary: StudySummary, trials: list, plots: Path) -> str:
    """One HTML file, readable offline: the outcome, the plots inline, every trial."""
    def cell(value) -> str:
        return html.escape("" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))

    facts = [("trials", ", ".join(f"{n} {state}" for state, n in summary.states.items())),
             (f"recipe as written: validation {summary.metric}", summary.as_written_value),
             *([(f"the advice (trial {summary.advice_trial}): validation {summary.metric}", summary.advice_value)]
               if summary.advice_trial is not None else []),
             (f"best: trial {summary.best_trial}, validation {summary.metric}", summary.best_value),
             ("best values", short_values(summary.best_values)),
             ("best on test (measured once)", ", ".join(f"{k} {v:.4f}" for k, v in (summary.test or {}).items()
                                                        if isinstance(v, float)) or "no test split"),
             ("best recipe", summary.best_recipe)]
    rows = "".join(f"<tr><th>{html.escape(name)}</th><td>{cell(value)}</td></tr>" for name, value in facts)
    images = "".join(f"<h2>{name}</h2><img alt='{name}' src='data:image/png;base64,"
                     f"{base64.b64encode((plots / f'{name}.png').read_bytes()).decode()}'>" for name in summary.plots)
    listing = "".join(f"<tr><td>{t.number}</td><td>{t.state.name.lower()}</td><td>{cell(trial_value(t))}</td>"
                      f"<td>{cell(t.duration.total_seconds() if t.duration else None)}</td>"
                      f"<td>{cell(short_values(t.user_attrs.get('values', t.params)))}</td></tr>" for t in trials)
    buffer = io.StringIO()
    buffer.write(f"<!doctype html><html><head><meta charset='utf-8'><title>study {html.escape(summary.study_name)}"
                 "</title><style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 8px;text-align:left}"
                 "table{border-collapse:collapse}tr:nth-child(even){background:#f4f4f4}</style></head><body>")
    buffer.write(f"<h1>study {html.escape(summary.study_name)}</h1><table>{rows}</table>{images}")
    buffer.write(f"<h2>trials</h2><table><tr><th>trial</th><th>state</th><th>validation {html.escape(summary.metric)}"
                 f"</th><th>seconds</th><th>values</th></tr>{listing}</table></body></html>")
    return buffer.getvalue()


def _print(summary: StudySummary, console: Console) -> None:
    states = ", ".join(f"{n} {state}" for state, n in summary.states.items())
    console.print(f"study {summary.study_name}: {states}")
    if summary.best_trial is None:
        console.print("[yellow]no trial completed[/]")
        return
    written = "not finished" if summary.as_written_value is None else f"{summary.as_written_value:.4f}"
    console.print(f"best: trial {summary.best_trial}, validation {summary.metric} {summary.best_value:.4f} "
                  f"(the recipe as written: {written}" + ("" if summary.advice_value is None else
                                                          f"; the advice, trial {summary.advice_trial}: "
                                                          f"{summary.advice_value:.4f}") + ")")
    console.print(f"      {short_values(summary.best_values)}", soft_wrap=True)
    if summary.test:
        console.print(f"best trial on test (measured once): {summary.metric} {summary.test.get(summary.metric)}")
    console.print(f"best recipe: {summary.best_recipe}; report: {summary.study_dir / PAGE}")
