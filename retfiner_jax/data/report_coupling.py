"""How much a corpus's reports say about a label: a bag-of-words logistic regression from report to label,
cross-validated balanced accuracy (scikit-learn).

A figure near 1 means the text names the label (text supervision is then label supervision); near chance, the
reports carry nothing of it. The demo prints it for each probe task on the refinement corpus.
"""
from __future__ import annotations

import numpy as np


def report_to_label_bacc(reports, labels, folds: int = 5, seed: int = 0) -> float:
  """Mean balanced accuracy over `folds` stratified folds of word-count (unigram and bigram) logistic regression
  predicting `labels` from `reports`. Groups of rows are not kept together: use it on one row per patient eye."""
  from sklearn.feature_extraction.text import CountVectorizer
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import StratifiedKFold, cross_val_score
  from sklearn.pipeline import make_pipeline

  reports, labels = list(reports), np.asarray(list(labels))
  if len(reports) != len(labels):
    raise ValueError(f"{len(reports)} reports but {len(labels)} labels")
  classes, counts = np.unique(labels, return_counts=True)
  if len(classes) < 2:
    raise ValueError(f"report_to_label_bacc needs two classes or more; the labels hold only {classes.tolist()}")
  folds = min(folds, int(counts.min()))
  if folds < 2:
    raise ValueError(f"class {classes[counts.argmin()]!r} has {counts.min()} row(s): too few to cross-validate")
  model = make_pipeline(CountVectorizer(ngram_range=(1, 2), lowercase=True, token_pattern=r"(?u)\b\w+\b"),
                        LogisticRegression(max_iter=2000, class_weight="balanced"))
  scores = cross_val_score(model, reports, labels, scoring="balanced_accuracy",
                           cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
  return float(np.mean(scores))
