"""The trials of a study as a live table on a terminal (a line per finished trial in a log)."""

from __future__ import annotations

import optuna
from rich.console import Console
from rich.live import Live
from rich.table import Table

SHOWN = 15  # the newest trials a live table shows
STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan", "WAITING": "dim"}


def short_values(values: dict) -> str:
    """A trial's values in one line: the last part of each key (lr=3.2e-05, strategy=partial)."""
    def show(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    return ", ".join(f"{key.rsplit('.', 1)[-1]}={show(value)}" for key, value in values.items())


def trial_value(trial: optuna.trial.FrozenTrial) -> float | None:
    """The validation metric of a finished trial, or the last one a pruned trial reported (a failed one has none)."""
    if trial.state == optuna.trial.TrialState.FAIL:
        return None
    if trial.values:
        return trial.values[0]
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


class TrialTable:
    def __init__(self, study: optuna.Study, metric: str, console: Console, live: bool):
        self.study, self.metric, self.console = study, metric, console
        self.live = Live(console=console, refresh_per_second=1, transient=False) if live and console.is_terminal else None
        done = [t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        self.printed: set[int] = set(done)  # a log shows what this command adds
        if done and self.live is None:
            console.print(f"study {study.study_name}: continuing after {len(done)} finished trials")

    def __enter__(self) -> TrialTable:
        if self.live is not None:
            self.live.start()
        self.refresh()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()

    def refresh(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        if self.live is not None:
            self.live.update(self._table(trials))
            return
        for trial in trials:
            if trial.state.is_finished() and trial.number not in self.printed:
                self.printed.add(trial.number)
                value = trial_value(trial)
                shown = "" if value is None else f" {self.metric} {value:.4f}"
                if trial.state == optuna.trial.TrialState.FAIL:
                    shown = f" ({trial.user_attrs.get('error', 'interrupted')})"
                self.console.print(f"trial {trial.number} {trial.state.name.lower()}{shown}: "
                                   f"{short_values(trial.user_attrs.get('values', trial.params))}", soft_wrap=True)

    def _table(self, trials: list) -> Table:
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = None
        if done:
            maximise = self.study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
            best = (max if maximise else min)(done, key=lambda t: t.values[0]).number
        table = Table(title=f"study {self.study.study_name}: {len(done)} complete of {len(trials)} trials")
        for column in ("trial", "state", f"validation {self.metric}", "seconds", "values"):
            table.add_column(column, overflow="fold")
        for trial in trials[-SHOWN:]:
            value = trial_value(trial)
            seconds = trial.duration.total_seconds() if trial.duration else None
            style = STATE_STYLE.get(trial.state.name, "")
            table.add_row(f"{trial.number}{' *' if trial.number == best else ''}", f"[{style}]{trial.state.name.lower()}[/]",
                          "" if value is None else f"{value:.4f}", "" if seconds is None else f"{seconds:.0f}",
                          short_values(trial.user_attrs.get("values", trial.params)))
        return table
