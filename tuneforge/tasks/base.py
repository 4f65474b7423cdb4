"""What every task shares: the loss of a batch through the model, evaluating a whole split, and
predicting for a few prepared inputs. Tasks whose model computes its own loss (detection) or whose
outputs need the inputs' sizes (segmentation, detection) override these."""

from __future__ import annotations

import torch


class TaskBase:
    # What must be saved with the model to predict again, beside the recipe's settings (tuneforge.json).
    info: dict = {}

    def compute_loss(self, model, inputs: dict, targets):
        """The training loss of one batch."""
        return self.loss(model(**inputs).logits, targets)

    def evaluate(self, model, loader, accelerator) -> dict:
        """The task's metrics over a loader's whole split (gathered from every process)."""
        from tuneforge.training.loop import predict_logits

        outputs, targets = predict_logits(model, loader, accelerator)
        return self.metrics(outputs, targets)

    def predict(self, outputs, items: list) -> list[dict]:
        """Predictions for a forward pass over `items` (texts or PIL images)."""
        return self.predictions(outputs.logits)



def gather_by_index(accelerator, indices: list[int], values: list) -> dict:
    """{example index: value} over every process. Each example counts once: when processes pad their last
    batch with repeated examples (so batches stay even), the repeats land on the same index."""
    if accelerator.num_processes > 1:
        indices = accelerator.gather_for_metrics(indices, use_gather_object=True)
        values = accelerator.gather_for_metrics(values, use_gather_object=True)
    return dict(zip(indices, values))


def example_nll(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> list[tuple[float, int]]:
    """Per example: (summed token negative log-likelihood, tokens counted), positions labelled -100 left out.
    shift: a causal LM predicts token t+1 at position t; a seq2seq decoder's logits line up with its labels."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return list(zip(nll.sum(1).tolist(), (labels != -100).sum(1).tolist()))


def mean_token_loss(per_example) -> tuple[float, int]:
    """(mean over every token of the split, token count) from example_nll's pairs."""
    total = sum(nll for nll, _ in per_example)
    tokens = sum(count for _, count in per_example)
    return total / max(tokens, 1), int(tokens)
