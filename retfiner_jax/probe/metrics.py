"""Test-split metrics (scikit-learn), their summary over seeds, and the paired comparison of two encoders."""
from __future__ import annotations

import numpy as np

METRICS = ("bacc", "auroc", "ap", "f1", "mcc")


def classification_metrics(y_true, proba) -> dict:
  """Balanced accuracy, AUROC (binary; one-vs-rest macro for several classes), average precision (binary;
  macro over one-vs-rest), weighted F1 and MCC of argmax predictions."""
  from sklearn import metrics as skm
  y_true = np.asarray(y_true)
  pred = proba.argmax(-1)
  num_classes = proba.shape[1]
  if num_classes == 2:
    auroc = skm.roc_auc_score(y_true, proba[:, 1])
    ap = skm.average_precision_score(y_true, proba[:, 1])
  else:
    auroc = skm.roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=np.arange(num_classes))
    ap = skm.average_precision_score(np.eye(num_classes)[y_true], proba, average="macro")
  return {"bacc": float(skm.balanced_accuracy_score(y_true, pred)), "auroc": float(auroc), "ap": float(ap),
          "f1": float(skm.f1_score(y_true, pred, average="weighted")),
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
