"""Build a small, randomly initialised text model with a tokenizer trained on your own text, for trying the
seq2seq and causal_lm recipes on a machine without internet (no pretrained T5 or GPT-2 can be downloaded).

    python examples/tiny_text_model.py --arch t5 --out runs/tiny-t5-multi30k \\
        ../shared/data/multi30k/train.en.gz ../shared/data/multi30k/train.de.gz
    python examples/tiny_text_model.py --arch gpt2 --out runs/tiny-gpt2-multi30k ../shared/data/multi30k/train.en.gz

The tokenizer is a byte-pair encoding learned from the given files (sentencepiece-style: a word's first piece
carries its leading space, so decoding gives back the text's own spacing and letters, umlauts included). The
model is saved with save_pretrained, so recipes load it like any Hugging Face folder. With internet, skip this
and point model.name at a pretrained model (t5-small, facebook/bart-base, Helsinki-NLP/opus-mt-en-de, gpt2).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]  # ids 0..3: T5's pad=0 and eos=1 conventions


def lines(paths: list[str], limit: int | None):
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as file:
            for number, line in enumerate(file):
                if limit is not None and number >= limit:
                    break
                yield line.strip()


def train_tokenizer(paths: list[str], vocab_size: int, end_with_eos: bool, limit: int | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(lines(paths, limit), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    if end_with_eos:  # encoder-decoder targets and sources end in </s>, as T5's, BART's and Marian's do
        tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>")


def build_model(arch: str, vocab_size: int, width: int, layers: int, positions: int):
    from transformers import (BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel, MarianConfig,
                              MarianMTModel, T5Config, T5ForConditionalGeneration)

    heads = max(1, width // 32)
    if arch == "t5":
        return T5ForConditionalGeneration(T5Config(vocab_size=vocab_size, d_model=width, d_ff=4 * width, d_kv=width // heads,
                                                   num_layers=layers, num_decoder_layers=layers, num_heads=heads,
                                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    shared = dict(vocab_size=vocab_size, d_model=width, encoder_layers=layers, decoder_layers=layers,
                  encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * width,
                  decoder_ffn_dim=4 * width, max_position_embeddings=positions, pad_token_id=0, eos_token_id=1,
                  bos_token_id=3, decoder_start_token_id=3 if arch == "bart" else 0)
    if arch == "bart":
        return BartForConditionalGeneration(BartConfig(**shared, forced_eos_token_id=1))
    if arch == "marian":
        return MarianMTModel(MarianConfig(**shared))
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=width, n_layer=layers, n_head=heads,
                                      n_positions=positions, bos_token_id=3, eos_token_id=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="text files (.gz too), one sentence a line, to learn the vocabulary from")
    parser.add_argument("--arch", choices=["t5", "bart", "marian", "gpt2"], default="t5")
    parser.add_argument("--out", required=True, help="folder to write the model and tokenizer to")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--positions", type=int, default=256, help="longest input (BART, Marian, GPT-2)")
    parser.add_argument("--lines", type=int, default=None, help="read at most this many lines of each file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.manual_seed(args.seed)
    tokenizer = train_tokenizer(args.files, args.vocab_size, end_with_eos=args.arch != "gpt2", limit=args.lines)
    model = build_model(args.arch, len(tokenizer), args.width, args.layers, args.positions)
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{args.arch}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(tokenizer)} tokens -> {out}")


if __name__ == "__main__":
    main()
