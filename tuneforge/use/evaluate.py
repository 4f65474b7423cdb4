"""Use a finished run on files: evaluate it on new labelled data, predict new inputs."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.data.common import read_labelled_file
from tuneforge.use.predictor import load


def evaluate_run(run: str | Path, data: str | Path, output: str | Path | None = None, factory=None) -> dict:
    """All of the task's metrics for a run's model on a labelled file or folder, read and checked as training read
    its splits (`factory`: see tuneforge.load)."""
    predictor = load(run, factory)
    task, loaded = predictor.task, predictor.loaded
    split = read_labelled_file(str(data), predictor.data_spec, type(task), predictor.info)
    targets = type(task).encode_targets(split.labels, predictor.info.label_values, predictor.data_spec)
    dataset = task.dataset(split, targets, loaded.preprocessor)
    for note in dataset.notes:
        print(f"data: {note}")
    metrics = task.evaluate(*task.file_loader(loaded, dataset))
    if output:
        Path(output).write_text(json.dumps(metrics, indent=2))
    return metrics


def predict_run(run: str | Path, inputs: str | Path, output: str | Path, draw: str | Path | None = None,
                factory=None) -> int:
    """Write the task's prediction per input row (or image) to a .jsonl or .csv file; returns how many.
    Segmentation also writes each predicted mask, at its image's size, as OUTPUT-masks/<image name>.png (class
    index per pixel); detection with `draw`, each image with its boxes drawn, into that folder."""
    predictor = load(run, factory)
    return predictor.task.predict_file(predictor.loaded, predictor.data_spec, Path(inputs), Path(output),
                                       Path(draw) if draw else None)
