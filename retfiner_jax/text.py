"""Report text -> BERT token ids (WordPiece, uncased), padded and truncated to a fixed length."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def load_tokenizer(path):
  """A BERT WordPiece tokenizer from a `vocab.txt` file or a folder holding one (or a tokenizer.json)."""
  from transformers import BertTokenizerFast
  path = Path(path)
  if path.is_dir():
    if (path / "tokenizer.json").exists() or (path / "vocab.txt").exists():
      return BertTokenizerFast.from_pretrained(str(path))
    raise FileNotFoundError(f"{path}: no vocab.txt or tokenizer.json in this folder")
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such vocabulary file")
  return BertTokenizerFast(vocab=str(path), do_lower_case=True)


def tokenize(tokenizer, texts, max_length: int):
  """-> {"input_ids", "attention_mask"}: int32 arrays (len(texts), max_length); also how many were truncated."""
  enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                  return_attention_mask=True, return_overflowing_tokens=False, return_length=False)
  ids = np.asarray(enc["input_ids"], np.int32)
  full = tokenizer(list(texts), truncation=False, add_special_tokens=True)["input_ids"]
  truncated = int(sum(len(f) > max_length for f in full))
  return {"input_ids": ids, "attention_mask": np.asarray(enc["attention_mask"], np.int32), "truncated": truncated}
