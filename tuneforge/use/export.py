"""tuneforge export: a run's model as a deployable folder, with a model card written from the run's records.

Formats:
  hf            safetensors + config (label map) + tokenizer or image processor: `from_pretrained` loads it
                (an adapter run is exported merged, so the folder needs neither peft nor the base model;
                prompt and prefix tuning cannot merge, so their runs export to the formats below only)
  onnx          model.onnx with dynamic batch (and sequence) axes, checked with onnxruntime against PyTorch
  torch-export  model.pt2 from torch.export with a dynamic batch (and sequence) dimension, checked the same way;
                its positional arguments are config.json's "inputs" (text: input_ids, attention_mask[, token_type_ids])
Every format also gets the preprocessor files, tuneforge.json (labels, columns, max length) and README.md
(the model card, see model_card.py).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tuneforge.artifacts import model_folder, read_model_info, replace_folder, task_of, write_model_info
from tuneforge.config import AdapterSpec
from tuneforge.errors import ModelError, StorageError, TuneforgeError
from tuneforge.models.adapters import merged_copy
from tuneforge.models.folder import save_model_folder
from tuneforge.models.loading import LoadedModel, example_inputs
from tuneforge.use.model_card import write_model_card
from tuneforge.use.predictor import load_saved

FORMATS = ("hf", "onnx", "torch-export")
TOLERANCE = 1e-4  # max |exported - PyTorch| on the check inputs, in logits


@dataclass
class ExportResult:
    folder: Path
    format: str
    max_abs_diff: float | None  # None for hf: the same weights, nothing converted


class LogitsOnly(nn.Module):
    """Positional inputs in, logits out: the plain signature ONNX and torch.export want."""

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs))).logits


def _plain(loaded: LoadedModel) -> LoadedModel:
    """The model without an adapter: merged into its weights, eval mode."""
    model = merged_copy(loaded.model) if loaded.base is not None else loaded.model
    model.eval()
    return replace(loaded, model=model, base=None)


def _dynamic_axes(names: list[str]) -> dict:
    return {name: ({0: "batch", 1: "sequence"} if name != "pixel_values" else {0: "batch"}) for name in names}


def _export_onnx(loaded: LoadedModel, target: Path) -> float:
    try:
        import onnxruntime
    except ImportError:
        raise ModelError(["--format onnx needs onnxruntime to check the export: pip install 'tuneforge[export]'"]) from None

    example = example_inputs(loaded, 2)
    names = list(example)
    wrapper = LogitsOnly(loaded.model, names).eval()
    with torch.no_grad():
        torch.onnx.export(wrapper, tuple(example.values()), str(target), input_names=names, output_names=["logits"],
                          dynamic_axes=_dynamic_axes(names), dynamo=False, opset_version=17)
    check = example_inputs(loaded, 3)  # another batch size and sequence length than the export saw
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    feed = {name: value.numpy() for name, value in check.items()}
    exported = session.run(["logits"], feed)[0]
    with torch.no_grad():
        reference = wrapper(*check.values()).numpy()
    return float(np.abs(exported - reference).max())


def _export_torch(loaded: LoadedModel, target: Path) -> float:
    example = example_inputs(loaded, 2)
    names = list(example)
    wrapper = LogitsOnly(loaded.model, names).eval()
    # DYNAMIC lets torch.export infer the valid range (e.g. sequence <= the model's positions) instead of failing.
    dynamic = torch.export.Dim.DYNAMIC
    shapes = tuple({0: dynamic} if name == "pixel_values" else {0: dynamic, 1: dynamic} for name in names)
    with torch.no_grad():
        program = torch.export.export(wrapper, tuple(example.values()), dynamic_shapes=(shapes,))  # one *inputs
    torch.export.save(program, str(target))
    check = example_inputs(loaded, 3)
    reloaded = torch.export.load(str(target)).module()
    with torch.no_grad():
        return float((reloaded(*check.values()) - wrapper(*check.values())).abs().max())


EXPORT_MARKERS = ("tuneforge.json", "config.json", "README.md")  # what every export holds


def _check_output(output: Path, overwrite: bool) -> None:
    """An export replaces only an empty folder or, with --overwrite, an earlier export: never other files."""
    if output.exists() and not output.is_dir():
        raise StorageError([f"--output {output} is a file; choose a folder"])
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not overwrite:
        raise StorageError([f"{output} exists and is not empty; choose another --output or pass --overwrite"])
    is_export = all((output / name).is_file() for name in EXPORT_MARKERS) and not any(p.is_dir() for p in output.iterdir())
    if not is_export:
        raise StorageError([f"{output} is not an earlier tuneforge export (no {', '.join(EXPORT_MARKERS)}, or it holds "
                            "folders); --overwrite replaces only an export: choose another --output"])


def _export_checked(loaded: LoadedModel, target: Path, fmt: str) -> float:
    """Write the onnx or torch-export program into `target`; its largest logit difference from PyTorch."""
    exporter, name = (_export_onnx, "model.onnx") if fmt == "onnx" else (_export_torch, "model.pt2")
    try:
        with warnings.catch_warnings():  # tracing notes about Python branches; the check below is what counts
            warnings.simplefilter("ignore")
            difference = exporter(loaded, target / name)
    except TuneforgeError:
        raise
    except Exception as error:  # the exporters raise many types; the message is what matters
        raise ModelError([f"this model cannot be exported as {fmt}: {type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}"]) from None
    if difference > TOLERANCE:
        raise ModelError([f"the {fmt} export differs from PyTorch by up to {difference:.2e} in the logits "
                          f"(tolerance {TOLERANCE:g}); not using it"])
    return difference


def export_run(run: str | Path, fmt: str, output: str | Path, overwrite: bool = False, factory=None) -> ExportResult:
    """Export a run (or a model folder) to `output`; raises when the exported model disagrees with PyTorch."""
    if fmt not in FORMATS:
        raise ModelError([f"--format {fmt!r} is not one of {', '.join(FORMATS)}"])
    source, output = model_folder(run), Path(output)
    _check_output(output, overwrite)
    info = read_model_info(source)
    task_class = task_of(info, source)
    if fmt not in task_class.export_formats:
        raise ModelError([f"--format {fmt} exports one forward pass to logits, and a {info.task} model "
                          f"{task_class.export_note}: export it with --format {' or '.join(task_class.export_formats)} "
                          "(transformers' own classes read it)"])
    info, loaded, task = load_saved(source, factory)
    if fmt == "hf" and loaded.base is not None and not AdapterSpec(**loaded.base["adapter"]).mergeable:
        raise ModelError([f"{source} was trained with adapter.method {loaded.base['adapter']['method']}, whose vectors a "
                          "plain transformers folder has no place for; export it with --format onnx or torch-export"])
    loaded = _plain(loaded)
    info = task.fold_for_export(loaded, info)
    labels = info.label_names

    def write(target: Path) -> float | None:  # into a sibling folder, swapped in whole: never a half-written export
        target.mkdir(parents=True)
        difference = None
        if fmt == "hf":
            save_model_folder(loaded, target, labels)
        else:
            loaded.preprocessor.save_pretrained(target)
            (target / "config.json").write_text(json.dumps(
                {"id2label": {str(i): label for i, label in enumerate(labels)}, "format": fmt, "task": info.task,
                 "inputs": list(example_inputs(loaded, 1)), "outputs": ["logits"]}, indent=2))
            difference = _export_checked(loaded, target, fmt)
        write_model_info(target, info)
        write_model_card(run, source, target, fmt, difference)
        return difference

    output.parent.mkdir(parents=True, exist_ok=True)
    return ExportResult(output, fmt, replace_folder(output, write))
