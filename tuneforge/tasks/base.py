"""What every task shares: the loss of a batch through the model, evaluating a whole split, and
predicting for a few prepared inputs. Tasks whose model computes its own loss (detection) or whose
outputs need the inputs' sizes (segmentation, detection) override these."""

from __future__ import annotations


class TaskBase:
    def compute_loss(self, model, inputs: dict, targets):
        """The training loss of one batch."""
        return self.loss(model(**inputs).logits, targets)

    def evaluate(self, model, loader, accelerator) -> dict:
        """The task's metrics over a loader's whole split (gathered from every process)."""
        from tuneforge.loop import predict_logits

        outputs, targets = predict_logits(model, loader, accelerator)
        return self.metrics(outputs, targets)

    def predict(self, outputs, items: list) -> list[dict]:
        """Predictions for a forward pass over `items` (texts or PIL images)."""
        return self.predictions(outputs.logits)
