"""Deciding for the user: `tune` searches strategies and hyperparameters with Optuna (study.py runs the study,
trial.py one trial, report.py writes what it found); `advise` measures the data and the frozen features before
any training and recommends a strategy (advice.py)."""
