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
  """-> {"input_ids", "attention_mask"}: int32 arrays (len(texts), max_length), and "truncated": how many texts
  were longer than max_length tokens. Truncation keeps [CLS] ... [SEP] as BERT's tokenizer does."""
  full = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
  ids = np.zeros((len(full), max_length), np.int32)
  truncated = 0
  for row, seq in enumerate(full):
    if len(seq) > max_length:
      seq = seq[:max_length - 1] + [tokenizer.sep_token_id]
      truncated += 1
    ids[row, :len(seq)] = seq
  return {"input_ids": ids, "attention_mask": (ids != tokenizer.pad_token_id).astype(np.int32),
          "truncated": truncated}
