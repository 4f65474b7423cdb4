"""What every task shares: evaluating a whole split through the model."""

from __future__ import annotations


class TaskBase:
    def evaluate(self, model, loader, accelerator) -> dict:
        """The task's metrics over a loader's whole split (gathered from every process)."""
        from tuneforge.loop import predict_logits

        outputs, targets = predict_logits(model, loader, accelerator)
        return self.metrics(outputs, targets)
