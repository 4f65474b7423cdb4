"""Inputs to predict, as the tasks take them from Python, files and HTTP requests: each checked on its own, so a
bad one is that input's error and never fails the inputs batched with it."""

from __future__ import annotations

import io

from PIL import Image

from tuneforge.errors import DataError


def check_text_input(item, index: int, pairs: bool):
    """A text (or a [text, pair] list) to predict, as valid Unicode."""
    if not (is_pair(item) if pairs else isinstance(item, str)):
        raise DataError([f"input {index} must be a [text, pair] list of two strings" if pairs else f"input {index} is not text"])
    check_unicode(item if pairs else [item], index)
    return item


def open_image_input(item, index: int):
    """A PIL image, a path or the bytes of an image file, opened as RGB."""
    try:
        if isinstance(item, Image.Image):
            return item.convert("RGB")
        source = io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, ValueError, TypeError, Image.DecompressionBombError) as error:
        raise DataError([f"input {index} is not a readable image ({type(error).__name__}: {error})"]) from None


def is_pair(item) -> bool:
    return isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(t, str) for t in item)


def check_unicode(texts, index: int) -> None:
    """A Python str may hold a lone surrogate (JSON's "\\ud800" decodes to one) that no UTF-8 encoder or tokenizer
    takes. Found here it is this input's error; found in the tokenizer it would fail every input batched with it."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            # repr, so that the message itself stays encodable
            raise DataError([f"input {index} is not valid Unicode: it holds the lone surrogate "
                             f"{text[error.start]!r}"]) from None
