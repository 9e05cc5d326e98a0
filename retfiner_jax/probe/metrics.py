"""Test-split metrics (scikit-learn), their summary over seeds, and the paired comparison of two encoders."""
from __future__ import annotations

import numpy as np

METRICS = ("bacc", "auroc", "ap", "f1", "mcc")


def classification_metrics(y_true, proba) -> dict:
  """The original's `evaluate` (linear_probing/src/utils/train_eval.py): balanced accuracy, AUROC =
  roc_auc_score(one-hot, probs, multi_class="ovr", average="weighted"), AP = average_precision_score(one-hot,
  probs, average="weighted") (binary tasks too), weighted F1 (zero_division=0) and MCC of argmax predictions."""
  from sklearn import metrics as skm
  y_true = np.asarray(y_true)
  proba = np.asarray(proba)
  pred = proba.argmax(-1)
  onehot = np.eye(proba.shape[1])[y_true]
  return {"bacc": float(skm.balanced_accuracy_score(y_true, pred)),
          "auroc": float(skm.roc_auc_score(onehot, proba, multi_class="ovr", average="weighted")),
          "ap": float(skm.average_precision_score(onehot, proba, average="weighted")),
          "f1": float(skm.f1_score(y_true, pred, average="weighted", zero_division=0)),
          "mcc": float(skm.matthews_corrcoef(y_true, pred))}


def summarise(per_seed: list) -> dict:
  return {m: {"mean": float(np.mean([r[m] for r in per_seed])), "std": float(np.std([r[m] for r in per_seed])),
              "per_seed": [float(r[m]) for r in per_seed]} for m in METRICS}


def paired_comparison(results: dict, first: str, second: str, metric: str = "bacc") -> dict:
  """second - first per dataset (mean over seeds), and the Wilcoxon signed-rank test over datasets x seeds."""
  from scipy.stats import wilcoxon
  diffs, per_dataset = [], {}
  for dataset, by_encoder in results.items():
    a, b = by_encoder[first][metric]["per_seed"], by_encoder[second][metric]["per_seed"]
    per_dataset[dataset] = float(np.mean(b) - np.mean(a))
    diffs += [y - x for x, y in zip(a, b)]
  diffs = np.asarray(diffs)
  p = float(wilcoxon(diffs).pvalue) if np.any(diffs != 0) else 1.0
  return {"metric": metric, "first": first, "second": second, "difference_per_dataset": per_dataset,
          "mean_difference": float(diffs.mean()), "pairs": int(len(diffs)), "wilcoxon_p": p}
