"""Classification metrics from predicted probabilities (scikit-learn), shared by training and validation."""
from __future__ import annotations

import numpy as np


def top_k_accuracy(y_true, probs, k: int) -> float:
    """Fraction of samples whose true class is among the k most probable (k capped at the class count)."""
    probs = np.asarray(probs)
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float(np.mean(np.any(top == np.asarray(y_true)[:, None], axis=1)))


def classification_metrics(y_true, probs, class_names: list[str]) -> dict:
    """top-1, top-5, per-class precision/recall/F1/support and the confusion matrix."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true)
    y_pred = np.argmax(probs, axis=1)
    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "n": int(len(y_true)),
        "top1": float(np.mean(y_pred == y_true)),
        "top5": top_k_accuracy(y_true, probs, 5),
        "per_class": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                             "support": int(s[i])} for i, name in enumerate(class_names)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def head_metrics(labels: dict, probs: dict, class_names: dict[str, list[str]]) -> dict:
    """Multi-task metrics: the primary (first) head's at the top level, every head's under `heads`."""
    heads = {name: classification_metrics(labels[name], probs[name], names) for name, names in class_names.items()}
    return {**heads[next(iter(heads))], "heads": heads}
