"""seq2seq, causal_lm, captioning and qa: training lowers the loss, padding and prompts are masked, packing and
perplexity are exact, splits keep images and articles whole, runs predict and export, bad input is reported.

Every model is tiny (2 layers, width 32) and uses a word-level tokenizer over a small vocabulary, so each word
is one token and every test runs offline in seconds."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import WORDS
from tuneforge.errors import DataError, ModelError, RecipeError

EXTRA = "red green blue square picture of".split()
VOCAB = ["<pad>", "</s>", "<unk>", "<s>", *WORDS, *EXTRA]
PAD, EOS, BOS = 0, 1, 3
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
QUIET = Console(quiet=True)


# ---------------------------------------------------------------- tiny models and data

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads and lose much to spinning when another process shares the
    cores (10 steps of a width-32 T5: 0.1 s on one thread, 3-5 s on two beside a busy neighbour)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def word_tokenizer(eos_after: bool, pad: bool = True):
    """Every word of VOCAB is one token; eos_after: T5-style, every text ends in </s>; pad: false as GPT-2's has none."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if eos_after:
        tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>" if pad else None, eos_token="</s>",
                                   unk_token="<unk>", bos_token="<s>")


@pytest.fixture(scope="session")
def tiny_generators(tmp_path_factory) -> dict[str, Path]:
    """Tiny T5 (tied embeddings, as t5-small), T5 untied (as flan-t5), BART, Marian and GPT-2 (with a pad token, and
    without one, as the real GPT-2) folders."""
    from transformers import (BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel, MarianConfig,
                              MarianMTModel, T5Config, T5ForConditionalGeneration)

    root = tmp_path_factory.mktemp("tiny-generators")
    n = len(VOCAB)
    t5 = dict(vocab_size=n, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, dropout_rate=0.0,
              decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
    bart = dict(vocab_size=n, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                pad_token_id=PAD, eos_token_id=EOS, dropout=0.0)
    gpt2 = GPT2Config(vocab_size=n, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=BOS, eos_token_id=EOS,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    builders = {
        "t5": (lambda: T5ForConditionalGeneration(T5Config(**t5)), True),
        "t5-untied": (lambda: untied(T5ForConditionalGeneration(T5Config(**t5))), True),
        "bart": (lambda: BartForConditionalGeneration(BartConfig(**bart, bos_token_id=BOS, decoder_start_token_id=EOS,
                                                                 forced_eos_token_id=EOS)), True),
        "marian": (lambda: MarianMTModel(MarianConfig(**bart, decoder_start_token_id=PAD)), True),
        "gpt2": (lambda: GPT2LMHeadModel(gpt2), False),
        "gpt2-nopad": (lambda: GPT2LMHeadModel(gpt2), False),
    }
    folders = {}
    for name, (build, eos_after) in builders.items():
        torch.manual_seed(0)
        folders[name] = root / name
        build().save_pretrained(folders[name])
        word_tokenizer(eos_after, pad=name != "gpt2-nopad").save_pretrained(folders[name])
    return folders


def untied(model):
    """An output layer of its own, as flan-t5 has (transformers 5 ties T5's whatever the config says, unless the
    checkpoint holds two different matrices)."""
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach() + 0.01 * torch.randn_like(model.shared.weight))
    return model


def sentences(count: int, seed: int, shortest: int = 2, longest: int = 5) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(shortest, longest))) for _ in range(count)]


def reversal_rows(count: int, seed: int) -> list[dict]:
    """Source -> its words in reverse order: learnable, and every target differs from its source."""
    return [{"text": s, "target": " ".join(reversed(s.split()))} for s in sentences(count, seed)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def caption_table(tmp_path_factory) -> Path:
    """12 one-colour squares, each with two captions; image paths relative to the table."""
    from PIL import Image

    root = tmp_path_factory.mktemp("captions")
    (root / "images").mkdir()
    rows = []
    for i in range(12):
        colour = list(COLOURS)[i % 3]
        Image.new("RGB", (40, 40), COLOURS[colour]).save(root / "images" / f"{i}.png")
        rows += [{"image": f"images/{i}.png", "caption": f"a {colour} square"},
                 {"image": f"images/{i}.png", "caption": f"a picture of a {colour} square"}]
    return write_jsonl(root / "captions.jsonl", rows)


QA_FILLER = WORDS[14:]


def squad_document(articles: int = 6, seed: int = 0) -> dict:
    """Articles of two paragraphs, one question each: 'the actor was ADJECTIVE' sits among filler words."""
    rng = random.Random(seed)
    data = []
    for a in range(articles):
        paragraphs = []
        for p in range(2):
            adjective = WORDS[(a * 2 + p) % 14]
            context = (" ".join(rng.choice(QA_FILLER) for _ in range(rng.randint(3, 8))) + f" the actor was {adjective} "
                       + " ".join(rng.choice(QA_FILLER) for _ in range(rng.randint(3, 8))))
            start = context.index(f"actor was {adjective}") + len("actor was ")
            paragraphs.append({"context": context, "qas": [{"id": f"q{a}-{p}", "question": "how was the actor",
                                                            "answers": [{"text": adjective, "answer_start": start}]}]})
        data.append({"title": f"article {a}", "paragraphs": paragraphs})
    return {"version": "1.1", "data": data}


def recipe(model: dict, data: dict, task: dict, /, **sections) -> dict:
    base = {"name": "text-task", "model": {"max_length": 16, **model}, "data": data, "task": task,
            "train": {"epochs": 1, "batch_size": 8, "seed": 0, "log_every_steps": 1},
            "optim": {"lr": 1e-2, "schedule": {"name": "constant"}}}
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values}
    return base


def run(recipe_dict: dict, out: Path):
    from tuneforge.training.run import finetune

    return finetune(recipe_dict, output_dir=out, console=QUIET)


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if entry.get("type") == kind]


def load(folder: Path, task: str, **model):
    from tuneforge.api import load_model
    from tuneforge.config import ImageSpec, ModelSpec

    return load_model(ModelSpec(name=str(folder), **model), [], ImageSpec(), task)


def memory_split(name: str = "train", **fields):
    from tuneforge.data.common import Split

    labels = fields.pop("labels")
    return Split(name, "memory", labels, [f"row {i + 1}" for i in range(len(labels))], **fields)


def fit_batch(model, task, batch: dict, steps: int = 10, lr: float = 1e-2) -> tuple[float, float]:
    """(loss before, loss after `steps` AdamW steps on this one batch), both measured without dropout."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def measure() -> float:
        model.eval()
        with torch.no_grad():
            return float(task.compute_loss(model, batch["inputs"], batch["labels"]))

    before = measure()
    model.train()
    for _ in range(steps):
        loss = task.compute_loss(model, batch["inputs"], batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, measure()


# ---------------------------------------------------------------- runs shared by several tests

@pytest.fixture(scope="module")
def seq2seq_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seq2seq-data")
    train = reversal_rows(32, seed=1)
    train.append({"text": " ".join(WORDS), "target": "good"})  # 28 words: longer than model.max_length 12
    return {"train": write_jsonl(root / "train.jsonl", train),
            "validation": write_jsonl(root / "validation.jsonl", reversal_rows(4, seed=2))}


def seq2seq_recipe(model_dir: Path, files: dict, /, **sections) -> dict:
    data = {"train": str(files["train"]), **({"validation": str(files["validation"])} if "validation" in files else {})}
    task = {"type": "seq2seq", "num_beams": 2, "max_new_tokens": 6, "max_target_length": 12, **sections.pop("task", {})}
    return recipe({"name": str(model_dir), "max_length": 12}, data, task, **sections)


@pytest.fixture(scope="module")
def seq2seq_run(tiny_generators, seq2seq_files, tmp_path_factory):
    return run(seq2seq_recipe(tiny_generators["t5"], seq2seq_files, train={"epochs": 2}, task={"source_prefix": "very "}),
               tmp_path_factory.mktemp("runs") / "seq2seq")


@pytest.fixture(scope="module")
def causal_lm_run(tiny_generators, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-data")
    lines = sentences(40, 3, 3, 8)
    lines.insert(5, "")  # a blank line separates, it is no text
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return run(recipe({"name": str(tiny_generators["gpt2"])}, {"train": str(root / "train.txt"), "validation_fraction": 0.2},
                      {"type": "causal_lm", "num_beams": 1, "max_new_tokens": 5}, train={"epochs": 2, "batch_size": 4}),
               root / "run")


@pytest.fixture(scope="module")
def captioning_run(tiny_vit_dir, tiny_generators, caption_table, tmp_path_factory):
    return run(recipe({"name": str(tiny_vit_dir), "decoder": str(tiny_generators["gpt2"])},
                      {"train": str(caption_table), "validation_fraction": 0.25},
                      {"type": "captioning", "num_beams": 2, "max_new_tokens": 5}, train={"epochs": 2}),
               tmp_path_factory.mktemp("runs") / "captioning")


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qa-data") / "squad.json"
    path.write_text(json.dumps(squad_document()))
    return path


@pytest.fixture(scope="module")
def qa_run(tiny_bert_dir, squad_file, tmp_path_factory):
    return run(recipe({"name": str(tiny_bert_dir), "max_length": 48}, {"train": str(squad_file), "test_fraction": 0.3},
                      {"type": "qa", "stride": 8}, train={"epochs": 2, "batch_size": 4}),
               tmp_path_factory.mktemp("runs") / "qa")


# ---------------------------------------------------------------- 1. a few steps lower the loss; generation runs

@pytest.mark.parametrize("arch", ["t5", "bart", "marian"])
def test_seq2seq_steps_lower_the_loss_and_generate_text(tiny_generators, arch):
    from tuneforge.data.text_datasets import Seq2SeqDataset
    from tuneforge.tasks.generation import Seq2SeqTask

    loaded = load(tiny_generators[arch], "seq2seq", max_length=16)
    rows = reversal_rows(8, seed=4)
    dataset = Seq2SeqDataset(memory_split(texts=[r["text"] for r in rows], labels=[r["target"] for r in rows]),
                             loaded.preprocessor, 16, 16)
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    task = Seq2SeqTask(loaded.preprocessor, num_beams=2, max_new_tokens=4, max_length=16)
    before, after = fit_batch(loaded.model, task, batch)
    assert after < 0.7 * before, (before, after)

    loaded.model.eval()
    with torch.no_grad():
        texts = task.generate(loaded.model, batch["inputs"])
        items = task.predict(loaded, ["good movie", "the plot was bad"])
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)
    assert [set(item) for item in items] == [{"text"}] * 2 and all(isinstance(i["text"], str) for i in items)


def test_causal_lm_steps_lower_the_loss_and_continue_a_prompt(tiny_generators):
    from tuneforge.data.text_datasets import CausalLMDataset
    from tuneforge.tasks.causal_lm import CausalLMTask

    loaded = load(tiny_generators["gpt2-nopad"], "causal_lm")  # as GPT-2: no pad token; padding is masked anyway
    tokenizer = loaded.preprocessor
    assert tokenizer.pad_token is None and loaded.model.generation_config.pad_token_id == EOS
    dataset = CausalLMDataset(memory_split(texts=sentences(8, seed=5), labels=[None] * 8), tokenizer, 16,
                              packing=False, instruction=False)
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    task = CausalLMTask(tokenizer, num_beams=1, max_new_tokens=3, max_length=4)
    before, after = fit_batch(loaded.model, task, batch)
    assert after < 0.7 * before, (before, after)
    loaded.model.eval()
    long_prompt = "the movie was very good but the plot was bad"
    items = task.predict(loaded, ["the movie", "a very good", long_prompt])
    assert len(items) == 3 and all(isinstance(item["text"], str) for item in items)
    assert (tokenizer.pad_token, tokenizer.padding_side, tokenizer.truncation_side) == (None, "right", "right")
    # A prompt longer than max_length keeps its end, which the continuation follows.
    assert items[2] == task.predict(loaded, ["but the plot was bad"])[0] == task.predict(loaded, ["the plot was bad"])[0]
    with pytest.raises(DataError, match="input 1 has no tokens"):
        task.predict(loaded, ["good", ""])


def test_captioning_steps_lower_the_loss_and_caption_images(tiny_vit_dir, tiny_generators, caption_table):
    from tuneforge.data.text_datasets import CaptionDataset
    from tuneforge.tasks.generation import CaptioningTask

    loaded = load(tiny_vit_dir, "captioning", decoder=str(tiny_generators["gpt2"]))
    lines = [json.loads(line) for line in caption_table.read_text().splitlines()][:8]
    split = memory_split(image_paths=[caption_table.parent / r["image"] for r in lines], labels=[r["caption"] for r in lines])
    dataset = CaptionDataset(split, loaded.preprocessor, 16)
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    task = CaptioningTask(loaded.preprocessor.tokenizer, num_beams=2, max_new_tokens=4)
    before, after = fit_batch(loaded.model, task, batch)
    assert after < 0.7 * before, (before, after)

    from PIL import Image

    loaded.model.eval()
    with torch.no_grad():
        texts = task.generate(loaded.model, batch["inputs"])
        items = task.predict(loaded, [Image.open(split.image_paths[0]).convert("RGB")])
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)
    assert len(items) == 1 and isinstance(items[0]["text"], str)
    assert all(target[-1] == EOS for target in dataset.targets)  # captions end, so generation learns to stop


def test_qa_steps_lower_the_loss_and_answer_from_the_context(tiny_bert_dir):
    from tuneforge.data.qa import QAExample
    from tuneforge.data.text_datasets import QADataset
    from tuneforge.tasks.qa import QATask

    loaded = load(tiny_bert_dir, "qa", max_length=48)
    examples = [QAExample(qa["id"], article["title"], paragraph["context"], qa["question"],
                          [(a["text"], a["answer_start"]) for a in qa["answers"]], qa["id"])
                for article in squad_document()["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    dataset = QADataset(memory_split(texts=[e.question for e in examples], labels=examples), loaded.preprocessor, 48, 8)
    batch = dataset.collate([dataset[i] for i in range(8)])
    task = QATask(loaded.preprocessor, max_length=48, stride=8)
    before, after = fit_batch(loaded.model, task, batch)
    assert after < 0.7 * before, (before, after)
    loaded.model.eval()
    [answer] = task.predict(loaded, [{"question": examples[0].question, "context": examples[0].context}])
    assert examples[0].context[answer["start"]:answer["end"]] == answer["answer"] != ""


# ---------------------------------------------------------------- 2. runs predict, deterministically

def prediction_inputs(kind: str, caption_table: Path):
    from PIL import Image

    context = squad_document()["data"][0]["paragraphs"][0]["context"]
    return {"seq2seq": ["good movie", "the plot was not very good"],
            "causal_lm": ["the movie", "a good"],
            "captioning": [str(caption_table.parent / "images" / "0.png"), Image.new("RGB", (40, 40), COLOURS["blue"])],
            "qa": [{"question": "how was the actor", "context": context}, ["how was the actor", context]]}[kind]


@pytest.mark.parametrize("kind", ["seq2seq", "causal_lm", "captioning", "qa"])
def test_a_finished_run_predicts_the_same_after_every_load(kind, caption_table, request):
    import tuneforge

    result = request.getfixturevalue(f"{kind}_run")
    inputs = prediction_inputs(kind, caption_table)
    first = tuneforge.load(result.run_dir).predict(inputs)
    second = tuneforge.load(result.run_dir).predict(inputs)
    assert first == second
    assert len(first) == len(inputs)
    if kind == "qa":
        assert all(set(p) == {"answer", "start", "end", "score", "probability"} for p in first)
        assert first[0] == first[1]  # a {question, context} dict and a [question, context] pair are the same input
    else:
        assert all(set(p) == {"text"} and isinstance(p["text"], str) for p in first)
    single = tuneforge.load(result.run_dir).predict(inputs[0])
    assert single == first[0]


def test_causal_lm_predict_returns_only_the_continuation(causal_lm_run):
    import tuneforge

    predictor = tuneforge.load(causal_lm_run.run_dir)
    tokenizer, model = predictor.loaded.preprocessor, predictor.loaded.model
    prompt = "the movie was"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=1, max_new_tokens=5, do_sample=False,
                              pad_token_id=PAD)
    expected = tokenizer.decode(full[0, ids.shape[1]:], skip_special_tokens=True)
    assert predictor.predict(prompt) == {"text": expected}
    # Left padding: a prompt continues the same beside a longer one.
    assert predictor.predict([prompt, "a very good film and a very bad plot"])[0] == {"text": expected}


def test_run_metrics_hold_each_tasks_scores(seq2seq_run, causal_lm_run, captioning_run, qa_run):
    splits = records(causal_lm_run.run_dir, "data")[0]["splits"]
    assert splits["train"]["examples"] + splits["validation"]["examples"] == 40  # the blank line is no text
    assert {"bleu", "chrf", "rougeL", "loss"} <= set(seq2seq_run.metrics["splits"]["validation"])
    lm = causal_lm_run.metrics["splits"]["validation"]
    assert lm["perplexity"] == pytest.approx(torch.tensor(lm["loss"]).exp().item(), rel=1e-6) and lm["tokens"] > 0
    assert {"bleu", "loss"} <= set(captioning_run.metrics["splits"]["validation"])
    assert {"exact_match", "f1", "loss"} <= set(qa_run.metrics["splits"]["test"])


# ---------------------------------------------------------------- 3. label padding is masked

def seq2seq_batch_parts(folder: Path):
    from tuneforge.data.text_datasets import Seq2SeqDataset

    loaded = load(folder, "seq2seq", max_length=16)
    sources = ["good movie", "the plot was not very good but the actor was great and the film was fine"]
    targets = ["movie good", "fine was film the and great was actor the but good very not was plot the"]
    dataset = Seq2SeqDataset(memory_split(texts=sources, labels=targets), loaded.preprocessor, 32, 32)
    return loaded, dataset


def test_seq2seq_labels_are_ignore_exactly_at_padding(tiny_generators):
    from tuneforge.data.tokens import IGNORE

    loaded, dataset = seq2seq_batch_parts(tiny_generators["t5"])
    batch = dataset.collate([dataset[0], dataset[1]])
    labels, ids, mask = batch["labels"], batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"]
    for row, item in enumerate([dataset[0], dataset[1]]):
        n, m = len(item["target"]), len(item["source"])
        assert labels[row, :n].tolist() == item["target"].tolist()
        assert (labels[row, n:] == IGNORE).all() and (labels[row, :n] != IGNORE).all()
        assert item["target"][-1] == EOS  # targets end so generation learns to stop
        assert mask[row].tolist() == [1] * m + [0] * (ids.shape[1] - m)
        assert (ids[row, m:] == PAD).all()
    assert labels.shape[1] == len(dataset[1]["target"]) > len(dataset[0]["target"])


@pytest.mark.parametrize("arch", ["t5", "bart", "marian"])
def test_a_longer_example_in_the_batch_does_not_change_another_examples_loss(tiny_generators, arch):
    from tuneforge.data.tokens import IGNORE

    loaded, dataset = seq2seq_batch_parts(tiny_generators[arch])
    model = loaded.model.eval()

    def per_example(batch):
        with torch.no_grad():
            outputs = model(**batch["inputs"], labels=batch["labels"])
        losses = torch.nn.functional.cross_entropy(outputs.logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE,
                                                   reduction="none")
        real = (batch["labels"] != IGNORE).float()
        return (losses * real).sum(1) / real.sum(1), outputs.loss

    alone, model_loss_alone = per_example(dataset.collate([dataset[0]]))
    together, model_loss = per_example(dataset.collate([dataset[0], dataset[1]]))
    torch.testing.assert_close(together[0], alone[0], rtol=1e-4, atol=1e-5)
    # The model's own loss is the mean over real target tokens only, computed here from the unpadded targets.
    with torch.no_grad():
        logits = model(**dataset.collate([dataset[0], dataset[1]])["inputs"],
                       labels=dataset.collate([dataset[0], dataset[1]])["labels"]).logits
    total, count = 0.0, 0
    for row in range(2):
        target = torch.as_tensor(dataset[row]["target"])
        total += float(torch.nn.functional.cross_entropy(logits[row, :len(target)], target, reduction="sum"))
        count += len(target)
    assert float(model_loss) == pytest.approx(total / count, rel=1e-4)
    assert float(model_loss_alone) == pytest.approx(float(alone[0]), rel=1e-4)


# ---------------------------------------------------------------- 4. causal LM: prompts, packing, perplexity

def test_instruction_format_learns_only_the_response(tiny_generators, tmp_path):
    from tuneforge.api import load_task_data
    from tuneforge.data.tokens import IGNORE
    from tuneforge.tasks.causal_lm import CausalLMTask
    from tuneforge.config import load_recipe

    rows = [{"prompt": "is the movie good", "response": "very good"}, {"prompt": "the plot", "response": "was bad but fine"}]
    spec = load_recipe(recipe({"name": str(tiny_generators["gpt2"])},
                              {"train": str(write_jsonl(tmp_path / "chat.jsonl", rows)), "prompt_column": "prompt",
                               "response_column": "response"}, {"type": "causal_lm", "packing": False}))
    data = load_task_data(spec.data, spec.task)
    tokenizer = word_tokenizer(eos_after=False)
    dataset = CausalLMTask.for_run(spec, data, tokenizer).dataset(data.splits["train"], [], tokenizer)
    for index, row in enumerate(rows):
        prompt = tokenizer(row["prompt"])["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [EOS]
        item = dataset[index]
        assert item["ids"].tolist() == prompt + response
        assert item["labels"].tolist() == [IGNORE] * len(prompt) + response
    batch = dataset.collate([dataset[0], dataset[1]])
    assert (batch["labels"][0, len(dataset[0]["ids"]):] == IGNORE).all()  # and the padding too


def test_packing_makes_full_blocks_without_padding():
    from tuneforge.data.text_datasets import CausalLMDataset
    from tuneforge.data.tokens import IGNORE

    tokenizer = word_tokenizer(eos_after=False)
    texts = sentences(20, 6, 1, 7)
    dataset = CausalLMDataset(memory_split(texts=texts, labels=[None] * len(texts)), tokenizer, 8, packing=True,
                              instruction=False)
    stream = [token for text in texts for token in tokenizer(text)["input_ids"] + [EOS]]
    assert len(dataset) == len(stream) // 8 >= 3
    assert all(len(dataset[i]["ids"]) == 8 for i in range(len(dataset)))
    assert [t for i in range(len(dataset)) for t in dataset[i]["ids"].tolist()] == stream[:len(dataset) * 8]
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    assert batch["inputs"]["input_ids"].shape == (len(dataset), 8)
    assert batch["inputs"]["attention_mask"].all() and (batch["labels"] != IGNORE).all()
    assert torch.equal(batch["labels"], batch["inputs"]["input_ids"])


@pytest.mark.parametrize("packing", [False, True])
def test_perplexity_is_exp_of_the_mean_token_nll(tiny_generators, packing):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from torch.utils.data import DataLoader

    from tuneforge.data.text_datasets import CausalLMDataset
    from tuneforge.data.tokens import IGNORE
    from tuneforge.tasks.causal_lm import CausalLMTask

    loaded = load(tiny_generators["gpt2"], "causal_lm")
    texts = sentences(7, 7, 1, 9)  # different lengths: padded batches of 3, 3 and 1
    dataset = CausalLMDataset(memory_split(texts=texts, labels=[None] * len(texts)), loaded.preprocessor, 6 if packing else 16,
                              packing=packing, instruction=False)
    AcceleratorState._reset_state()
    metrics = CausalLMTask(loaded.preprocessor).evaluate(loaded.model, DataLoader(dataset, batch_size=3,
                                                                                  collate_fn=dataset.collate),
                                                         Accelerator(cpu=True))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):  # one unpadded example at a time
            ids, labels = torch.as_tensor(dataset[i]["ids"]), dataset[i]["labels"].tolist()
            log_probs = torch.log_softmax(loaded.model(input_ids=ids[None]).logits[0].double(), -1)
            for t in range(len(ids) - 1):
                if labels[t + 1] != IGNORE:
                    total, count = total - float(log_probs[t, labels[t + 1]]), count + 1
    assert metrics["tokens"] == count
    assert metrics["loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(float(torch.tensor(total / count).exp()), rel=1e-5)


# ---------------------------------------------------------------- 5. captioning: whole images, every caption a reference

def test_validation_fraction_keeps_each_image_on_one_side_with_all_its_captions(caption_table, tiny_vit_dir, tiny_generators):
    from tuneforge.api import load_task_data
    from tuneforge.data.text_datasets import CaptionDataset
    from tuneforge.models.text import CaptionProcessor
    from tuneforge.config import load_recipe

    captions: dict[Path, list[str]] = {}
    for line in caption_table.read_text().splitlines():
        row = json.loads(line)
        captions.setdefault(caption_table.parent / row["image"], []).append(row["caption"])
    for seed in range(4):
        spec = load_recipe(recipe({"name": str(tiny_vit_dir), "decoder": str(tiny_generators["gpt2"])},
                                  {"train": str(caption_table), "validation_fraction": 0.3, "split_seed": seed},
                                  {"type": "captioning"}))
        splits = load_task_data(spec.data, spec.task).splits
        train, validation = set(splits["train"].image_paths), set(splits["validation"].image_paths)
        assert train and validation and not train & validation
        assert train | validation == set(captions)
        assert len(splits["train"]) + len(splits["validation"]) == 24
    processor = CaptionProcessor(None, word_tokenizer(eos_after=False))
    dataset = CaptionDataset(splits["validation"], processor, 16)
    for path, references in zip(dataset.paths, dataset.references):
        assert sorted(references) == sorted(captions[path])


def test_captioning_scores_each_image_once_against_all_its_captions(captioning_run):
    validation = captioning_run.metrics["splits"]["validation"]
    assert validation["samples"] and all(len(s["references"]) == 2 for s in validation["samples"])
    images = records(captioning_run.run_dir, "data")[0]["splits"]["validation"]["examples"] // 2
    assert len(validation["samples"]) == min(images, 5)


# ---------------------------------------------------------------- 6. question answering

def test_qa_test_fraction_holds_out_whole_articles(squad_file, tiny_bert_dir):
    from tuneforge.api import load_task_data
    from tuneforge.config import load_recipe

    for seed in range(4):
        spec = load_recipe(recipe({"name": str(tiny_bert_dir)}, {"train": str(squad_file), "test_fraction": 0.3,
                                                                 "validation_fraction": 0.2, "split_seed": seed},
                                  {"type": "qa"}))
        splits = load_task_data(spec.data, spec.task).splits
        titles = {name: {e.title for e in split.labels} for name, split in splits.items()}
        assert all(titles.values())
        assert not titles["train"] & titles["test"] and not titles["train"] & titles["validation"]
        assert not titles["validation"] & titles["test"]
        assert sum(len(s) for s in splits.values()) == 12


def test_qa_run_answers_with_offsets_into_the_context(qa_run):
    import tuneforge

    assert records(qa_run.run_dir, "data")[0]["splits"]["test"]["examples"] >= 2
    predictor = tuneforge.load(qa_run.run_dir)
    questions = [{"question": qa["question"], "context": p["context"]}
                 for article in squad_document()["data"] for p in article["paragraphs"] for qa in p["qas"]]
    for question, answer in zip(questions, predictor.predict(questions)):
        assert answer["answer"] and question["context"][answer["start"]:answer["end"]] == answer["answer"]
        assert 0 < answer["probability"] <= 1
    # A context of several windows (48 tokens each): offsets still point into the whole context.
    long_context = " ".join(random.Random(9).choice(QA_FILLER) for _ in range(90)) + " the actor was superb ."
    [answer] = predictor.predict([["how was the actor", long_context]])
    assert answer["answer"] and long_context[answer["start"]:answer["end"]] == answer["answer"]
    with pytest.raises(DataError, match="input 0"):
        predictor.predict([{"question": "", "context": "the actor"}])
    with pytest.raises(DataError, match="question is too long"):  # 40 tokens leave a 48-token window no room
        predictor.predict([{"question": " ".join(["actor"] * 40), "context": "the actor was good"}])


# ---------------------------------------------------------------- 7. freezing and LR strategies on encoder-decoders

def test_partial_freezing_trains_only_the_last_block_neck_and_head(tiny_generators, seq2seq_files, tmp_path):
    from safetensors.torch import load_file

    files = {"train": seq2seq_files["train"]}  # no validation: the model saved is the last step's
    result = run(seq2seq_recipe(tiny_generators["t5-untied"], files, train={"max_steps": 3},
                                model={"freeze": {"strategy": "partial", "trainable_blocks": 1}}), tmp_path / "run")
    before = load_file(str(tiny_generators["t5-untied"] / "model.safetensors"))
    after = load_file(str(result.run_dir / "model" / "model.safetensors"))
    trainable = ("decoder.block.1.", "encoder.final_layer_norm.", "decoder.final_layer_norm.", "lm_head.")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(trainable) for name in changed), sorted(changed)
    assert any(name.startswith("decoder.block.1.") for name in changed)
    assert "lm_head.weight" in changed and "shared.weight" not in changed


def test_partial_freezing_works_on_a_tied_embedding_model(tiny_generators, seq2seq_files, tmp_path):
    """T5 ties its output layer to the input embeddings, so there is no head group: partial trains the last block
    and the final norms, and the shared embedding (input and output at once) stays bit-identical."""
    from safetensors.torch import load_file

    result = run(seq2seq_recipe(tiny_generators["t5"], {"train": seq2seq_files["train"]}, train={"max_steps": 3},
                                model={"freeze": {"strategy": "partial", "trainable_blocks": 1}}), tmp_path / "run")
    before = load_file(str(tiny_generators["t5"] / "model.safetensors"))
    after = load_file(str(result.run_dir / "model" / "model.safetensors"))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(name.startswith("decoder.block.1.") for name in changed)
    trainable = ("decoder.block.1.", "encoder.final_layer_norm.", "decoder.final_layer_norm.")
    assert all(name.startswith(trainable) for name in changed), sorted(changed)
    assert "shared.weight" in before and "shared.weight" not in changed


def test_layerwise_decay_gives_encoder_blocks_smaller_lrs_than_decoder_blocks(tiny_generators, seq2seq_files, tmp_path):
    from tuneforge.config import load_recipe
    from tuneforge.training.run import assemble, make_accelerator

    spec = load_recipe(seq2seq_recipe(tiny_generators["t5"], seq2seq_files,
                                      optim={"lr_strategy": "layerwise_decay", "layer_decay": 0.5}))
    t = assemble(spec, make_accelerator(spec), QUIET, tmp_path / "never", False)
    assert not (tmp_path / "never").exists()
    lrs = {group["name"].split("/")[0]: group["initial_lr"] for group in t.optimization.optimizer.param_groups}
    where = {g.name: g.modules[0].split(".")[0] for g in t.optimization.groups if g.name.startswith("block.")}
    encoder = [lrs[name] for name, stack in where.items() if stack == "encoder"]
    decoder = [lrs[name] for name, stack in where.items() if stack == "decoder"]
    assert len(encoder) == len(decoder) == 2
    assert max(encoder) < min(decoder)
    assert lrs["embeddings"] < min(encoder) and max(decoder) < lrs["neck"] == pytest.approx(1e-2)


def test_head_only_on_a_tied_embedding_model_is_a_recipe_error(tiny_generators, seq2seq_files, tmp_path):
    with pytest.raises(RecipeError) as caught:
        run(seq2seq_recipe(tiny_generators["t5"], seq2seq_files, model={"freeze": {"strategy": "head_only"}}),
            tmp_path / "run")
    assert "head" in str(caught.value) and "model.freeze" in str(caught.value)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 8. bad input: reported, never a crash

def expect_data_error(recipe_dict: dict, out: Path, *fragments: str) -> str:
    with pytest.raises(DataError) as caught:
        run(recipe_dict, out)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    return message


def test_empty_sources_and_targets_are_reported_with_their_lines(tiny_generators, tmp_path):
    rows = reversal_rows(8, seed=8)
    rows[2]["text"] = "   "
    rows[4]["target"] = ""
    rows[6]["target"] = None
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows)}
    expect_data_error(seq2seq_recipe(tiny_generators["t5"], files), tmp_path / "run",
                      "1 empty or missing value(s) in column 'text' at train.jsonl:3",
                      "2 empty or missing value(s) in column 'target' at train.jsonl:5, train.jsonl:7")


def parallel_recipe(model_dir: Path, folder: Path, english: str, german: str) -> dict:
    """pairs.en (plain) aligned with pairs.de.gz (gzipped), as a seq2seq recipe reading them."""
    (folder / "pairs.en").write_text(english)
    with gzip.open(folder / "pairs.de.gz", "wt") as file:
        file.write(german)
    raw = seq2seq_recipe(model_dir, {"train": folder / "pairs"})
    raw["data"].update(format="parallel", source_language="en", target_language="de")
    return raw


def test_parallel_files_with_different_line_counts_are_reported(tiny_generators, tmp_path):
    spec = parallel_recipe(tiny_generators["t5"], tmp_path, "good movie\nbad film\nthe plot\n", "movie good\nfilm bad\n")
    expect_data_error(spec, tmp_path / "run", "pairs.en has 3 lines", "pairs.de.gz has 2")


def test_parallel_files_are_read_line_by_line_gzipped_or_not(tiny_generators, tmp_path):
    from tuneforge.api import load_task_data
    from tuneforge.config import load_recipe

    spec = load_recipe(parallel_recipe(tiny_generators["t5"], tmp_path, "good movie\n\nthe plot\n",
                                       "movie good\nfilm bad\nplot the\n"))
    with pytest.raises(DataError, match=r"1 empty or missing value\(s\) in column 'source' at pairs.en:2"):
        load_task_data(spec.data, spec.task)
    (tmp_path / "pairs.en").write_text("good movie\nbad film\nthe plot\n")
    split = load_task_data(spec.data, spec.task).splits["train"]
    assert split.texts == ["good movie", "bad film", "the plot"]
    assert split.labels == ["movie good", "film bad", "plot the"]


def test_a_caption_of_a_missing_image_is_reported(tiny_vit_dir, tiny_generators, caption_table, tmp_path):
    rows = [json.loads(line) for line in caption_table.read_text().splitlines()]
    rows[3]["image"] = "images/nowhere.png"
    table = write_jsonl(caption_table.parent / "broken.jsonl", rows)
    expect_data_error(recipe({"name": str(tiny_vit_dir), "decoder": str(tiny_generators["gpt2"])}, {"train": str(table)},
                             {"type": "captioning"}), tmp_path / "run", "1 unreadable image(s)", "nowhere.png")


def test_a_squad_answer_not_at_its_answer_start_is_reported(tiny_bert_dir, tmp_path):
    document = squad_document()
    document["data"][1]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 2
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(document))
    expect_data_error(recipe({"name": str(tiny_bert_dir), "max_length": 48}, {"train": str(path)}, {"type": "qa", "stride": 8}),
                      tmp_path / "run", "1 answer(s) whose text is not at answer_start", "id q1-0")


def test_an_overlong_source_is_cut_with_a_counted_note(seq2seq_run):
    note = "1 train sources longer than 12 tokens were cut to 12 (train.jsonl:33)"  # 28 words, the prefix, </s>
    assert note in records(seq2seq_run.run_dir, "data")[0]["notes"]
    assert seq2seq_run.metrics["steps"] > 0


def test_a_qa_stride_too_long_for_the_window_is_a_recipe_error(tiny_bert_dir, squad_file, tmp_path):
    from tuneforge.config import load_recipe

    with pytest.raises(RecipeError, match="task.stride 24 must be less than half of model.max_length 48"):
        run(recipe({"name": str(tiny_bert_dir), "max_length": 48}, {"train": str(squad_file)}, {"type": "qa", "stride": 24}),
            tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # Unset, the stride is a quarter of the window (96 of 384, as usual for BERT-size windows).
    assert load_recipe(recipe({"name": "m", "max_length": 384}, {"train": "s.json"}, {"type": "qa"})).task.stride == 96
    # Windows can still be too short for a long question beside the stride: refused when the data is tokenised.
    long_questions = squad_document()
    for article in long_questions["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qa["question"] = " ".join(["actor"] * 40)  # 40 + 3 special tokens leave 5 of 48 for context
    (tmp_path / "long.json").write_text(json.dumps(long_questions))
    with pytest.raises(RecipeError, match="task.stride 8 with model.max_length 48"):
        run(recipe({"name": str(tiny_bert_dir), "max_length": 48}, {"train": str(tmp_path / "long.json")},
                   {"type": "qa", "stride": 8}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 9. export

def test_hf_export_generates_what_predict_says(seq2seq_run, tmp_path):
    import tuneforge
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from tuneforge.use.export import export_run

    export_run(seq2seq_run.run_dir, "hf", tmp_path / "hf")
    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval(), AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = prediction_inputs("seq2seq", Path()) + ["the actor"]
    predictor = tuneforge.load(seq2seq_run.run_dir)
    assert predictor.task.source_prefix == "very "  # what the model was trained with comes with it
    inputs = tokenizer(["very " + text for text in texts], padding=True, truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], num_beams=2,
                                   max_new_tokens=6)
    exported = [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    assert exported == [p["text"] for p in predictor.predict(texts)]


def test_the_source_prefix_is_put_before_sources_in_training_and_prediction(seq2seq_run):
    import tuneforge
    from tuneforge.data.text_datasets import Seq2SeqDataset

    predictor = tuneforge.load(seq2seq_run.run_dir)
    tokenizer, seen = predictor.task.tokenizer, []

    class Spy:  # the tokenizer, noting what it is asked to encode
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, texts, **options):
            seen.extend(texts)
            return tokenizer(texts, **options)

    predictor.task.tokenizer = Spy()
    predictor.predict(["good movie", "bad"])
    assert seen == ["very good movie", "very bad"]
    dataset = Seq2SeqDataset(memory_split(texts=["good movie"], labels=["movie good"]), tokenizer, 12, 12, "very ")
    assert dataset[0]["source"].tolist() == [VOCAB.index("very"), VOCAB.index("good"), VOCAB.index("movie"), EOS]


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_onnx_and_torch_export_of_a_generator_are_refused(seq2seq_run, tmp_path, fmt):
    from tuneforge.use.export import export_run

    with pytest.raises(ModelError, match="--format hf"):
        export_run(seq2seq_run.run_dir, fmt, tmp_path / fmt)
    assert not (tmp_path / fmt).exists()


# ---------------------------------------------------------------- evaluate, predict and serve from the command line

def test_evaluate_on_a_file_repeats_the_runs_own_figures(seq2seq_run, seq2seq_files, qa_run, tmp_path):
    from tuneforge.use.evaluate import evaluate_run

    again = evaluate_run(seq2seq_run.run_dir, seq2seq_files["validation"], tmp_path / "eval.json")
    saved = seq2seq_run.metrics["splits"]["validation"]
    for key in ("bleu", "chrf", "rouge1", "rougeL", "meteor", "loss", "num_examples"):
        assert again[key] == pytest.approx(saved[key], abs=1e-5), key
    assert json.loads((tmp_path / "eval.json").read_text())["bleu"] == again["bleu"]
    # QA: a SQuAD file of the run's own test questions gives the run's test figures.
    from tuneforge.api import load_task_data
    from tuneforge.config import load_recipe

    spec = load_recipe(qa_run.run_dir / "recipe.yaml")
    test = load_task_data(spec.data, spec.task).splits["test"].labels
    document = {"data": [{"title": e.title, "paragraphs": [{"context": e.context, "qas": [
        {"id": e.id, "question": e.question, "answers": [{"text": t, "answer_start": a} for t, a in e.answers]}]}]}
        for e in test]}
    (tmp_path / "test.json").write_text(json.dumps(document))
    scores = evaluate_run(qa_run.run_dir, tmp_path / "test.json")
    for key in ("exact_match", "f1", "num_examples"):
        assert scores[key] == pytest.approx(qa_run.metrics["splits"]["test"][key], abs=1e-6), key


def test_predict_writes_one_row_per_input_for_each_task(seq2seq_run, causal_lm_run, captioning_run, qa_run, caption_table,
                                                        squad_file, tmp_path):
    import csv

    import tuneforge
    from tuneforge.use.evaluate import predict_run

    (tmp_path / "sources.txt").write_text("good movie\n\nthe plot was bad\n")  # blank lines are skipped
    assert predict_run(seq2seq_run.run_dir, tmp_path / "sources.txt", tmp_path / "s.csv") == 2
    rows = list(csv.reader((tmp_path / "s.csv").open()))
    assert rows[0] == ["row", "text"] and [r[0] for r in rows[1:]] == ["sources.txt:1", "sources.txt:3"]
    assert [r[1] for r in rows[1:]] == [p["text"] for p in tuneforge.load(seq2seq_run.run_dir).predict(
        ["good movie", "the plot was bad"])]
    assert predict_run(causal_lm_run.run_dir, tmp_path / "sources.txt", tmp_path / "c.jsonl") == 2
    assert predict_run(captioning_run.run_dir, caption_table.parent / "images", tmp_path / "i.jsonl") == 12
    captions = [json.loads(line) for line in (tmp_path / "i.jsonl").read_text().splitlines()]
    assert all(isinstance(c["text"], str) and c["row"].endswith(".png") for c in captions)
    count = predict_run(qa_run.run_dir, squad_file, tmp_path / "a.jsonl")
    answers = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert count == len(answers) == sum(len(p["qas"]) for a in json.loads(squad_file.read_text())["data"]
                                        for p in a["paragraphs"])
    assert {"row", "answer", "start", "end", "score", "probability"} <= set(answers[0])


def test_serve_answers_questions_and_translates(qa_run, seq2seq_run):
    import tuneforge
    from test_serve import call, server

    question = {"question": "how was the actor", "context": "the plot was dull but the actor was superb ."}
    with server(qa_run.run_dir) as port:
        status, body = call(port, "POST", "/predict", {"inputs": [question, ["how was the plot", question["context"]]]})
        assert status == 200 and body["predictions"] == tuneforge.load(qa_run.run_dir).predict(
            [question, ["how was the plot", question["context"]]])
        status, body = call(port, "POST", "/predict", {"input": {"question": "", "context": "the actor"}})
        assert status == 422 and "input 0" in json.dumps(body)
        status, meta = call(port, "GET", "/metadata")
        assert status == 200 and meta["task"] == "qa" and "f1" in meta["run"]["evaluation"]
    with server(seq2seq_run.run_dir) as port:
        status, body = call(port, "POST", "/predict", {"input": "good movie"})
        assert status == 200 and body["prediction"] == tuneforge.load(seq2seq_run.run_dir).predict("good movie")


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(arch, tiny_generators, seq2seq_files, tmp_path,
                                                                  monkeypatch):
    from conftest import interrupt_after

    from tuneforge.training.checkpoint import checkpoint_weights, complete_checkpoints
    from tuneforge.training.run import finetune

    train = {"epochs": 2, "batch_size": 4, "checkpoint_every_steps": 4, "keep_checkpoints": 10}
    if arch == "t5":
        spec = seq2seq_recipe(tiny_generators["t5"], seq2seq_files, train=train)
    else:  # causal LM on the same sentences, unpacked: padded batches of different lengths
        spec = recipe({"name": str(tiny_generators["gpt2"]), "max_length": 16},
                      {"train": str(seq2seq_files["train"]), "validation": str(seq2seq_files["validation"])},
                      {"type": "causal_lm", "packing": False}, train=train)
    uninterrupted = run(spec, tmp_path / "a")
    interrupt_after(monkeypatch, 6)  # the last checkpoint before the stop: step 4, inside the first epoch
    with pytest.raises(KeyboardInterrupt):
        run(spec, tmp_path / "b")
    monkeypatch.undo()
    resumed = finetune(spec, output_dir=tmp_path / "b", resume=True, console=QUIET)
    last_a, last_b = (complete_checkpoints(r.run_dir / "checkpoints")[-1] for r in (uninterrupted, resumed))
    assert last_a.name == last_b.name
    a, b = checkpoint_weights(last_a), checkpoint_weights(last_b)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    key = "bleu" if arch == "t5" else "perplexity"
    assert resumed.metrics[key] == uninterrupted.metrics[key] and resumed.metrics["loss"] == uninterrupted.metrics["loss"]
    assert records(resumed.run_dir, "resume")[0]["step"] == 4


# ---------------------------------------------------------------- two processes

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["seq2seq", "qa"])
def test_two_processes_evaluate_like_one(kind, tiny_generators, seq2seq_files, tiny_bert_dir, squad_file, tmp_path):
    """Generated texts and answer spans are gathered from both processes, each example once: the figures equal one
    process's (no training, so the weights are the same)."""
    import yaml
    from test_distributed import _train

    if kind == "seq2seq":
        spec = seq2seq_recipe(tiny_generators["t5"], {**seq2seq_files, "validation": seq2seq_files["train"]})
        keys = ("bleu", "chrf", "rougeL", "meteor", "loss", "num_examples")
    else:
        spec = recipe({"name": str(tiny_bert_dir), "max_length": 48}, {"train": str(squad_file), "test_fraction": 0.5},
                      {"type": "qa", "stride": 8})
        keys = ("exact_match", "f1", "loss", "num_examples")
    spec["train"] = {"epochs": 0, "batch_size": 4}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(spec))
    _train(tmp_path / "recipe.yaml", tmp_path / "one", 1)
    _train(tmp_path / "recipe.yaml", tmp_path / "two", 2)
    one, two = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("one", "two"))
    assert two["hardware"]["processes"] == 2
    for key in keys:
        assert two[key] == pytest.approx(one[key], abs=1e-4), key


def test_the_captioning_template_recipe_trains_on_a_captions_folder(tiny_vit_dir, tiny_generators, caption_table, tmp_path,
                                                                    monkeypatch):
    from tuneforge.training.run import finetune

    monkeypatch.setenv("CAPTIONS_DATA", str(caption_table.parent))  # the shipped template, on generated images
    monkeypatch.setenv("CAPTION_ENCODER", str(tiny_vit_dir))
    monkeypatch.setenv("CAPTION_DECODER", str(tiny_generators["gpt2"]))
    result = finetune("recipes/captioning-vit-gpt2.yaml", ["model.max_length=16", "task.num_beams=2",
                                                           "task.max_new_tokens=5", "optim.lr=3.0e-3"],
                      output_dir=tmp_path / "run", console=QUIET)
    images = {name: record["examples"] for name, record in records(result.run_dir, "data")[0]["splits"].items()}
    assert images == {"train": 18, "validation": 2, "test": 4}  # captions: 12 images x 2, held out by whole images
    assert result.metrics["report_split"] == "test" and result.metrics["num_examples"] == 2  # images, each once
    assert {"bleu", "chrf", "rougeL", "meteor"} <= set(result.metrics)
