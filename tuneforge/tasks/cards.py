"""Pieces of model cards that several tasks write: Markdown tables, the label map, per-class tables."""

from __future__ import annotations


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def number(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def label_table(info, index_name: str) -> list[str]:
    """The label map: output index, label value, display name."""
    return ["### Labels", "", *table([index_name, "label value", "name"],
                                     [[i, value, name] for i, (value, name) in enumerate(zip(info.label_values,
                                                                                              info.label_names))])]


def per_class_table(split: str, metrics: dict) -> list[str]:
    """Precision, recall, F1 and support per class of one split."""
    if not metrics.get("per_class"):
        return []
    return ["", f"Per class on {split}:", "", *table(["class", "precision", "recall", "F1", "examples"], [
        [label, number(c["precision"]), number(c["recall"]), number(c["f1"]), c["support"]]
        for label, c in metrics["per_class"].items()])]


def rarest(data_record: dict, what: str) -> str:
    """How many training examples the rarest class (or label) had."""
    counts = data_record.get("train_class_counts")
    if not counts:
        return "- Class balance of the training data: unknown."
    return (f"- The rarest {what} had {min(counts.values())} training examples; rare labels are usually predicted "
            "less reliably (see the per-class table).")
