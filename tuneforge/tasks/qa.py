"""Extractive question answering: the model scores every token as an answer's start and end; the answer is
the best-scoring span inside the context, over every window of a long context (tuneforge.data.qa).
Metrics are SQuAD v1.1's official exact match and F1 against every gold answer of a question."""

from __future__ import annotations

import torch

from tuneforge.data.qa import QAExample, best_answers, prepare_features
from tuneforge.data.text_tasks import window_inputs
from tuneforge.errors import DataError
from tuneforge.tasks.base import TaskBase, gather_by_index
from tuneforge.tasks.text_metrics import squad_scores

SAMPLES = 5


class QATask(TaskBase):
    name = "qa"
    summary_keys = ("exact_match", "f1", "loss")

    def __init__(self, tokenizer=None, max_length: int = 384, stride: int = 128, max_answer_length: int = 30):
        self.tokenizer, self.max_length, self.stride, self.max_answer_length = tokenizer, max_length, stride, max_answer_length
        self.label_names: list[str] = []

    def compute_loss(self, model, inputs: dict, targets: torch.Tensor) -> torch.Tensor:
        """transformers' QA loss: the mean of the start and end positions' cross-entropies."""
        return model(**inputs, start_positions=targets[:, 0], end_positions=targets[:, 1]).loss

    def evaluate(self, model, loader, accelerator) -> dict:
        model.eval()
        indices, windows = [], []  # per window: (start logits, end logits, loss)
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            for batch in loader:
                labels = batch["labels"]
                with accelerator.autocast():
                    outputs = model(**batch["inputs"])
                lengths = batch["inputs"]["attention_mask"].sum(1).tolist()  # padding is never an answer
                for start, end, (first, last), n in zip(outputs.start_logits.float(), outputs.end_logits.float(),
                                                        labels.tolist(), lengths):
                    start, end = start[:n].cpu(), end[:n].cpu()
                    # transformers' QA loss per window (the mean of the start and end cross-entropies), over the window's
                    # own tokens: the model's version also spreads probability over the batch's padding
                    loss = (float(-start.log_softmax(-1)[first]) + float(-end.log_softmax(-1)[last])) / 2
                    windows.append((start, end, loss))
                indices += batch["index"].tolist()
        by_index = gather_by_index(accelerator, indices, windows)
        order = sorted(by_index)
        dataset = loader.dataset
        found = best_answers([by_index[i][0] for i in order], [by_index[i][1] for i in order], dataset.features,
                             dataset.examples, self.max_answer_length)
        predictions = [answer["answer"] for answer in found]
        scores = squad_scores(predictions, dataset.references)
        return {**scores, "loss": sum(by_index[i][2] for i in order) / max(len(order), 1), "windows": len(order),
                "samples": [{"question": e.question, "prediction": p, "answers": r}
                            for e, p, r in zip(dataset.examples[:SAMPLES], predictions, dataset.references)]}

    def predict_items(self, loaded, items: list) -> list[dict]:
        """Per {question, context}: the answer text, its character offsets in the context and its score."""
        examples = [QAExample(str(i), "", item["context"], item["question"], [], f"input {i}") for i, item in enumerate(items)]
        try:
            features = prepare_features(self.tokenizer, examples, self.max_length, self.stride)
        except ValueError as error:  # a question too long to leave the window room for context: the input's fault
            raise DataError([f"a question is too long for this model's windows ({error}); shorten it"]) from None
        starts, ends = [], []
        with torch.inference_mode():
            for first in range(0, len(features.input_ids), 16):
                rows = range(first, min(first + 16, len(features.input_ids)))
                batch = window_inputs(features, rows, self.tokenizer)
                outputs = loaded.model(**batch)
                lengths = batch["attention_mask"].sum(1).tolist()
                starts += [row[:n].float() for row, n in zip(outputs.start_logits, lengths)]
                ends += [row[:n].float() for row, n in zip(outputs.end_logits, lengths)]
        found = best_answers(starts, ends, features, examples, self.max_answer_length)
        return [{"answer": f["answer"], "start": f["start"], "end": f["end"], "score": f["score"],
                 "probability": f.get("probability")} for f in found]

    def csv_header(self) -> list[str]:
        return ["answer", "start", "end", "score"]

    def csv_row(self, prediction: dict) -> list:
        return [prediction["answer"], prediction["start"], prediction["end"], prediction["score"]]

