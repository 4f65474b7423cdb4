"""Prompt and prefix tuning across model families: where they attach, that attention over the prefix is
the textbook formula, that masks and causality survive, and that families without a place for them
get a clear error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tuneforge.models.adapters import AdapterSpec, adapter_parameters, attach_adapter
from tuneforge.errors import ModelError
from tuneforge.models.loading import LoadedModel, LoadReport
from tuneforge.models.prompts import PREFIX_MODULE, AttentionPrefix, prefix_attention

SMALL = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


class _Processor:
    """Stands in for an image processor: attach_adapter only asks it for the image size."""
    size = {"height": 32}


def _text(model, vocab=50):
    class Tokens:  # what example_inputs asks a tokenizer for: padded ids and a mask
        def __call__(self, texts, **_):
            lengths = [len(t.split()) + 2 for t in texts]
            ids = torch.zeros(len(texts), max(lengths), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, length in enumerate(lengths):
                ids[row, :length] = torch.arange(length) % (vocab - 1) + 1
                mask[row, :length] = 1
            return {"input_ids": ids, "attention_mask": mask}

    return LoadedModel(model, Tokens(), "text", [name for name in ("classifier", "score") if hasattr(model, name)],
                       LoadReport())


def _bert():
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(hidden_size=32, vocab_size=50, **SMALL)).eval()


def _roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification
    return RobertaForSequenceClassification(RobertaConfig(hidden_size=32, vocab_size=50, pad_token_id=0,
                                                          **SMALL)).eval()


def _distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    return DistilBertForSequenceClassification(DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                                vocab_size=50)).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2ForSequenceClassification
    return GPT2ForSequenceClassification(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50,
                                                    pad_token_id=0)).eval()


def _vit():
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(ViTConfig(hidden_size=32, image_size=32, patch_size=8, **SMALL)).eval()


def test_prefix_attention_is_softmax_over_prefix_and_keys():
    torch.manual_seed(0)
    module = nn.Module()
    module.is_causal = False
    module.add_module(PREFIX_MODULE, AttentionPrefix(heads=2, tokens=3, head_dim=4, key_std=1.0, value_std=1.0))
    query, key, value = (torch.randn(1, 2, 5, 4) for _ in range(3))
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., -1] = False  # the last key is padding
    out, _ = prefix_attention(module, query, key, value, mask, dropout=0.0, scaling=0.5)
    keys = torch.cat([module.tuneforge_prefix.key[None], key[..., :-1, :]], dim=2)
    values = torch.cat([module.tuneforge_prefix.value[None], value[..., :-1, :]], dim=2)
    expected = torch.softmax(query @ keys.transpose(-1, -2) * 0.5, dim=-1) @ values  # (1, heads, 5, 4)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6)


@pytest.mark.parametrize("build", [_bert, _roberta, _distilbert], ids=["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_text_families_take_both_and_padding_changes_nothing(build, method):
    torch.manual_seed(0)
    loaded = _text(build())
    attach_adapter(loaded, AdapterSpec(method=method, virtual_tokens=3))
    assert adapter_parameters(loaded.model)
    long, short = loaded.preprocessor(["a b c d e f g", "a b"]), loaded.preprocessor(["a b"])
    with torch.no_grad():
        together, alone = loaded.model(**long).logits, loaded.model(**short).logits
        assert torch.allclose(together[1], alone[0], atol=1e-5)


def test_vit_takes_a_visual_prompt_after_the_class_token_and_a_prefix():
    pixels = torch.randn(2, 3, 32, 32)
    for method, where in (("prompt", "vit.embeddings.tuneforge_prompt.weight"),
                          ("prefix", "vit.layers.1.attention.tuneforge_prefix.key")):
        torch.manual_seed(0)
        model = _vit()
        before = model(pixel_values=pixels).logits
        attach_adapter(LoadedModel(model, _Processor(), "image", ["classifier"], LoadReport()),
                       AdapterSpec(method=method, virtual_tokens=3))
        names = adapter_parameters(model)
        assert where in names, names
        with torch.no_grad():
            assert not torch.allclose(model(pixel_values=pixels).logits, before)  # the vectors take part


def test_gpt2_prefix_keeps_causality_and_prompt_is_refused():
    torch.manual_seed(0)
    loaded = _text(_gpt2())
    with pytest.raises(ModelError, match="adapter.prompt needs an embeddings module"):
        attach_adapter(loaded, AdapterSpec(method="prompt", virtual_tokens=3))
    attach_adapter(loaded, AdapterSpec(method="prefix", virtual_tokens=3))
    body = loaded.model.transformer
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    changed = ids.clone()
    changed[0, 4] = 11
    with torch.no_grad():
        a, b = body(input_ids=ids).last_hidden_state, body(input_ids=changed).last_hidden_state
    assert torch.allclose(a[0, :4], b[0, :4], atol=1e-6)  # a later token never reaches an earlier position
    assert not torch.allclose(a[0, 4], b[0, 4])


def test_a_model_outside_transformers_gets_a_clear_error():
    from tuneforge.models.factory import FactoryClassifier

    model = FactoryClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)))
    loaded = LoadedModel(model, _Processor(), "image", ["net.1"], LoadReport())
    with pytest.raises(ModelError, match="adapter.prefix needs a transformers model"):
        attach_adapter(loaded, AdapterSpec(method="prefix"))
    with pytest.raises(ModelError, match="adapter.prompt needs an embeddings module"):
        attach_adapter(loaded, AdapterSpec(method="prompt"))
