"""The classical reference for `finetune --task spam`: character TF-IDF + a linear SVM, same split.

    pip install scikit-learn
    python bench/spam_baseline.py store/data/finetune-spam-*/     # a prepared finetune-spam dataset

Reads the train / val / test texts that `llmstages prepare finetune-spam` wrote (so the split is
exactly the fine-tuned classifier's), fits TF-IDF over character 1-5-grams (within word bounds)
and a LinearSVC on train, picks C on val, and prints one JSON object with the test accuracy, spam
F1 and confusion matrix. scikit-learn is needed only here, not by llmstages.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_split(folder: Path, split: str) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def main() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
    from sklearn.svm import LinearSVC

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="a prepared finetune-spam dataset folder in the store")
    parser.add_argument("--positive", default="spam")
    args = parser.parse_args()
    train_x, train_y = read_split(args.dataset, "train")
    val_x, val_y = read_split(args.dataset, "val")
    test_x, test_y = read_split(args.dataset, "test")
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 5), sublinear_tf=True, min_df=2)
    train_m = vectorizer.fit_transform(train_x)

    def fit(c: float) -> LinearSVC:
        return LinearSVC(C=c).fit(train_m, train_y)

    scores = {c: f1_score(val_y, fit(c).predict(vectorizer.transform(val_x)), pos_label=args.positive)
              for c in (0.1, 0.3, 1.0, 3.0, 10.0)}
    best_c = max(scores, key=scores.get)
    predicted = fit(best_c).predict(vectorizer.transform(test_x))
    labels = sorted(set(train_y))
    print(json.dumps({
        "benchmark": "spam_baseline", "model": "char_wb 1-5-gram TF-IDF + LinearSVC", "C": best_c,
        "val_f1_by_C": scores, "train": len(train_x), "val": len(val_x), "test": len(test_x),
        "test_accuracy": round(accuracy_score(test_y, predicted), 4),
        "test_spam_f1": round(f1_score(test_y, predicted, pos_label=args.positive), 4),
        "labels": labels, "confusion": confusion_matrix(test_y, predicted, labels=labels).tolist(),
    }))


if __name__ == "__main__":
    main()
