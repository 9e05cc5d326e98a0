"""A WordPiece vocabulary built from a corpus's reports, in bert-base-uncased's id layout: for a BERT trained from
scratch on that corpus (the demo's text tower, the tests and benchmarks)."""
from __future__ import annotations

from pathlib import Path

SPECIAL = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                              "[unused99]", "[unused100]"]


def build_vocab(reports, size: int, path: Path) -> Path:
  """A WordPiece vocabulary of the reports in bert-base-uncased's id layout (specials keep their ids), built
  deterministically: every character, alone and as a `##` continuation (so no word is unknown), then the most
  frequent whole words (ties in alphabetical order) up to `size` entries. (The `tokenizers` trainer breaks ties
  differently from run to run, which changed the demo's vocabulary, and so its results, between identical runs.)"""
  from collections import Counter

  from tokenizers.normalizers import BertNormalizer
  from tokenizers.pre_tokenizers import BertPreTokenizer
  normalise, split = BertNormalizer(lowercase=True), BertPreTokenizer()
  counts = Counter(word for report in reports
                   for word, _ in split.pre_tokenize_str(normalise.normalize_str(report)))
  chars = sorted({c for word in counts for c in word})
  pieces = [p for p in chars + ["##" + c for c in chars] if p not in SPECIAL]
  room = max(size - len(SPECIAL) - len(pieces), 0)
  words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][:room]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(SPECIAL + pieces + words) + "\n")
  return path
