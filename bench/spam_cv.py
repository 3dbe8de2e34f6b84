"""Stratified k-fold cross-validation of `finetune --task spam` against two TF-IDF baselines, same folds.

    pip install -e ".[bench]"                         # scikit-learn, for the baselines only
    llmstages pretrain quickstart                     # the recipe's base (or give --base)
    python bench/spam_cv.py                           # 5 folds, the shipped recipe, JSON on stdout
    python bench/spam_cv.py --folds 5 --base quickstart finetune.pooling=mean --out cv-mean.json
    python bench/spam_cv.py --quick                   # smoke test: 2 folds, a tiny base, a few steps
    python bench/spam_cv.py --combine cv.json cv-s1.json --out cv-seeds.json   # seeds averaged per fold
    python bench/spam_cv.py --merge cv-f01.json cv-f234.json --out cv.json     # --only runs joined

Every message of the shared SMS file (4,738) is scored exactly once, by a model that never saw it:
the messages are dealt into k folds stratified by label, with exact duplicates kept in one fold
(llmstages.data.split.stratified_folds). For fold f, the other folds are split once more (the recipe's
data.val_fraction and split_seed, stratified, duplicates together) into a training part and a
validation part. Then, on exactly those parts:
    gpt        the recipe fine-tuned from its base (init_from, or --base) through llmstages' public
               `finetune` stage: trained on the training part, its checkpoint picked on the validation
               part (train.best_metric), fold f scored (the run's test_metrics.json);
    char_svm   TF-IDF of character 1-5-grams + LinearSVC, C picked by spam F1 on the validation part;
    word_lr    TF-IDF of word 1-2-grams + logistic regression, C picked the same way.
Reported per fold and as mean +- std (sample std over folds): accuracy, spam precision / recall / F1,
errors (misclassified messages), and per fold GPT minus each baseline with its mean and spread. Each
fold also lists the messages each system got wrong (indices into the file), and the summary pairs the
GPT with each baseline on them: messages only one of the two gets wrong, and McNemar's exact p-value
(bench/cv_paired.py), which says whether a gap is larger than chance. --combine adds how many messages
every run gets wrong (what no other seed fixes); --rescore adds the lists to a run of an older version:

    python bench/spam_cv.py --rescore cv-s9.json --work WORK_OF_THAT_RUN --out cv-s9-paired.json
KEY=VALUE arguments are recipe overrides, so settings can be compared on the same folds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from io import StringIO
from pathlib import Path

import numpy as np

from cv_paired import always_wrong, paired  # bench/

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = "sms_spam/SMSSpamCollection.tsv"
SYSTEMS = ("gpt", "char_svm", "word_lr")
FIGURES = ("accuracy", "precision", "recall", "f1", "errors")
C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
# --quick: a few steps leave some seeds' p(spam) above the recipe's threshold (0.2) for every message, so
# the smoke test labels at 0.5; the ensemble of the recipe (3 members) is kept, so its path is run too.
QUICK = ["train.epochs=0", "train.max_steps=30", "train.warmup_steps=3", "train.eval_every=10",
         "train.save_every=10", "train.log_every=10", "finetune.dapt_steps=10", "classify.threshold=0.5"]


def read_messages(path: Path, recipe) -> tuple[list[str], list[str]]:
    """(texts, labels) of the file, read as the recipe reads it (format, columns, quoting)."""
    from llmstages.data.examples import read_examples
    examples = read_examples([str(path)], "classify", recipe.data)
    return [e.text for e in examples], [e.label for e in examples]


def fold_parts(texts: list[str], labels: list[str], folds: np.ndarray, fold: int, recipe) -> dict[str, np.ndarray]:
    """Indices of the training part, the validation part (both from the other folds) and fold `fold`."""
    from llmstages.data.split import split_indices
    rest = np.flatnonzero(folds != fold)
    inner = split_indices(len(rest), val_fraction=recipe.data.val_fraction or 0.1, test_fraction=0.0,
                          seed=recipe.data.split_seed, strata=[labels[i] for i in rest],
                          groups=[texts[i] for i in rest])
    return {"train": rest[inner["train"]], "val": rest[inner["val"]], "test": np.flatnonzero(folds == fold)}


def scores(truth: list[str], predicted: list[str], positive: str) -> dict:
    t, p = np.asarray(truth) == positive, np.asarray(predicted) == positive
    tp, fp, fn = int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    errors = int((np.asarray(truth) != np.asarray(predicted)).sum())
    return {"accuracy": 1 - errors / len(truth), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0, "errors": errors}


def baselines(texts: list[str], labels: list[str], parts: dict, positive: str) -> dict:
    """The two TF-IDF models: fitted on the training part, C picked on the validation part, fold scored."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    def pick(vectorizer, model_of) -> dict:
        x = {k: [texts[i] for i in v] for k, v in parts.items()}
        y = {k: [labels[i] for i in v] for k, v in parts.items()}
        train = vectorizer.fit_transform(x["train"])
        val, test = vectorizer.transform(x["val"]), vectorizer.transform(x["test"])
        fitted = {c: model_of(c).fit(train, y["train"]) for c in C_GRID}
        best = max(C_GRID, key=lambda c: (scores(y["val"], fitted[c].predict(val), positive)["f1"], -c))
        predicted = fitted[best].predict(test)
        return {**scores(y["test"], predicted, positive), "C": best,
                "wrong": wrong_rows(parts["test"], labels, predicted)}

    return {
        "char_svm": pick(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 5), sublinear_tf=True, min_df=2),
                         lambda c: LinearSVC(C=c)),
        "word_lr": pick(TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True),
                        lambda c: LogisticRegression(C=c, max_iter=5000)),
    }


def wrong_rows(rows: np.ndarray, labels: list[str], predicted) -> list[int]:
    """Indices (into the whole file) of the messages of `rows` whose predicted label is not theirs: kept per
    fold so that systems can be compared message by message (cv_paired.py)."""
    return [int(i) for i, p in zip(rows, predicted) if labels[i] != p]


def gpt_scored(store, ref: str, texts: list[str], labels: list[str], rows: np.ndarray) -> dict:
    """{"wrong": wrong_rows, "roc_auc"} of a fold's scored classifier, decided as its test_metrics.json
    was (the saved threshold, the evaluation batch size)."""
    from llmstages.checkpoint import load_checkpoint
    from llmstages.classification import class_probabilities, decide, positive_index, roc_auc
    from llmstages.stages.classify import EVAL_BATCH, saved_decision

    ckpt = load_checkpoint(ref, store, ensemble_ok=True)
    tok, names = ckpt.tokenizer, ckpt.model.config.class_names
    probs = class_probabilities(ckpt.model, tok.encode_batch([texts[i] for i in rows]), tok.eot_id,
                                batch_size=EVAL_BATCH)
    decision = saved_decision(ckpt)
    positive = positive_index(names, decision["positive"])
    picked = decide(probs, positive, decision["threshold"]).tolist()
    truth = np.array([labels[i] == names[positive] for i in rows])
    return {"wrong": wrong_rows(rows, labels, [names[c] for c in picked]),
            "roc_auc": roc_auc(probs[:, positive].numpy(), truth)}


def write_jsonl(path: Path, texts: list[str], labels: list[str], rows: np.ndarray) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i in rows:
            f.write(json.dumps({"text": texts[i], "label": labels[i]}, ensure_ascii=False) + "\n")
    return str(path)


def gpt_fold(texts, labels, parts, fold: int, args, store, base_ref: str, work: Path) -> dict:
    """Fine-tune the recipe on the fold's training part (checkpoint picked on its validation part) and
    score the held-out fold: the run's test_metrics.json."""
    from rich.console import Console

    from llmstages.config import load_recipe
    from llmstages.stages.finetune import finetune

    recipe = load_recipe(args.recipe, args.overrides)
    files = {name: write_jsonl(work / f"fold{fold}-{name}.jsonl", texts, labels, rows) for name, rows in parts.items()}
    d = recipe.data
    d.source, d.val_source, d.test_source = [files["train"]], [files["val"]], [files["test"]]
    d.sha256, d.mirror, d.columns, d.format = [], [], [], "jsonl"
    d.text_field, d.label_field, d.val_fraction, d.test_fraction = "text", "label", 0.0, 0.0
    recipe.run = d.name = f"cv-fold{fold}"
    recipe.init_from = base_ref
    log = StringIO()
    started = time.perf_counter()
    try:
        result = finetune(recipe, store, console=Console(file=log, width=160))
    except BaseException:
        sys.stderr.write(log.getvalue()[-4000:])
        raise
    report = json.loads((store.run_dir(recipe.run) / "test_metrics.json").read_text())
    positive = report["positive"]
    row = report["per_class"][positive]
    seconds = round(time.perf_counter() - started, 1)
    figures = {"accuracy": report["accuracy"], "precision": row["precision"], "recall": row["recall"],
               "f1": row["f1"], "errors": report["examples"] - int(np.trace(np.asarray(report["confusion"]))),
               "roc_auc": report["roc_auc"], "checkpoint_step": report["step"], "steps": result.step,
               "train_seconds": seconds}
    again = gpt_scored(store, f"{recipe.run}@{report['step']}", texts, labels, parts["test"])
    if len(again["wrong"]) != figures["errors"] or not np.isclose(again["roc_auc"], figures["roc_auc"]):
        raise RuntimeError(f"fold {fold}: scored one by one {len(again['wrong'])} errors and ROC AUC "
                           f"{again['roc_auc']}, test_metrics.json {figures['errors']} and {figures['roc_auc']}")
    figures["wrong"] = again["wrong"]
    if members := member_scores(store, recipe.run, texts, labels, parts["test"]):
        figures["members"] = members
    return figures


def member_scores(store, run: str, texts: list[str], labels: list[str], rows: np.ndarray) -> list[dict]:
    """Each member of a soup or ensemble run (finetune.soup / finetune.ensemble: runs `<run>-member<k>`)
    scored alone on the fold, as its own test_metrics.json chose its checkpoint: errors, ROC AUC and the
    messages it gets wrong. Empty for an ordinary run."""
    members, k = [], 1
    while (run_dir := store.run_dir(f"{run}-member{k}")).is_dir():
        step = json.loads((run_dir / "test_metrics.json").read_text())["step"]  # the checkpoint it scored
        scored = gpt_scored(store, f"{run_dir.name}@{step}", texts, labels, rows)  # found in this --work
        members.append({"run": run_dir.name, "errors": len(scored["wrong"]), **scored})
        k += 1
    return members


def tiny_base(store, texts: list[str]) -> str:
    """--quick without --base: a 2-layer random GPT with a BPE tokenizer of the messages (DAPT in the
    quick overrides then pretrains it a little on each fold's training part)."""
    import torch

    from llmstages.checkpoint import save_checkpoint
    from llmstages.model import GPT, GPTConfig
    from llmstages.tokenizer import train_bpe

    tok = train_bpe(texts, 512)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    return str(save_checkpoint(store, "cv-tiny-base", 1, model, tok, {"task": "pretrain"}))


def summary(per_fold: list[dict]) -> dict:
    """mean / std of every figure of every system, and per fold GPT minus each baseline."""
    out: dict = {}
    for system in SYSTEMS:
        out[system] = {}
        for key in FIGURES + (("roc_auc",) if system == "gpt" else ()):
            values = [f[system][key] for f in per_fold]
            out[system][key] = {"mean": statistics.fmean(values),
                                "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    for other in SYSTEMS[1:]:
        diff = {}
        for key in FIGURES:
            values = [f["gpt"][key] - f[other][key] for f in per_fold]
            diff[key] = {"per_fold": values, "mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        out[f"gpt_minus_{other}"] = diff
        if (test := paired(per_fold, "gpt", other)) is not None:
            out[f"paired_{other}"] = test
    if (members := member_summary(per_fold)) is not None:
        out["members"] = members
    return out


def member_summary(per_fold: list[dict]) -> list[dict] | None:
    """For a soup or ensemble: each member alone over all the folds (errors, and paired with each
    baseline), the spread over seeds behind the combined model's figures. None for ordinary runs."""
    counts = {len(row["gpt"].get("members", [])) for row in per_fold}
    if len(counts) != 1 or not (count := counts.pop()):
        return None
    out = []
    for k in range(count):
        rows = [{"member": row["gpt"]["members"][k], **{s: row[s] for s in SYSTEMS[1:]}} for row in per_fold]
        entry = {"member": k + 1, "errors": sum(r["member"]["errors"] for r in rows)}
        for other in SYSTEMS[1:]:
            if (test := paired(rows, "member", other)) is not None:
                entry[f"paired_{other}"] = test
        out.append(entry)
    return out


def require_same(results: list[dict], names: list[str], keys: tuple[str, ...], rule: str) -> None:
    """ValueError naming the first run whose `keys` differ from the first run's (`rule` says why it matters)."""
    for name, other in zip(names[1:], results[1:]):
        for key in keys:
            if other.get(key) != results[0].get(key):
                raise ValueError(f"{name}: {key} is {other.get(key)!r}, {names[0]} has {results[0].get(key)!r}; "
                                 f"{rule}")


def combine(results: list[dict], names: list[str]) -> dict:
    """Runs of the same folds with other GPT settings (e.g. train.seed) -> one result whose GPT figures
    are, per fold, the mean over the runs; the summary (mean +- std over folds, GPT minus each baseline)
    is then computed as for one run. `combined` lists each run's own GPT means (the spread over seeds).

    The runs must share the data, the fold assignment and the scored folds; the baselines are fitted on
    the same parts, so they must agree too (else the folds were not the same)."""
    first = results[0]
    same = ("data", "messages", "positive", "folds", "scored_folds", "seed")
    require_same(results, names, same, "only runs of the same folds can be combined")
    for name, other in zip(names[1:], results[1:]):
        for mine, theirs in zip(first["per_fold"], other["per_fold"]):
            if any(mine[s] != theirs[s] for s in SYSTEMS[1:]):
                raise ValueError(f"{name}: the baselines of fold {mine['fold']} differ from {names[0]}'s; "
                                 "only runs of the same folds can be combined")
    per_fold = []
    for rows in zip(*(r["per_fold"] for r in results)):
        gpt = {key: statistics.fmean(row["gpt"][key] for row in rows) for key in FIGURES + ("roc_auc",)}
        per_fold.append({"fold": rows[0]["fold"], "sizes": rows[0]["sizes"], "gpt": gpt,
                         **{s: rows[0][s] for s in SYSTEMS[1:]}})
    seeds = [{"file": name, "command": r["command"], "overrides": r["overrides"],
              **{key: r["summary"]["gpt"][key]["mean"] for key in FIGURES},
              **{f"paired_{s}": r["summary"][f"paired_{s}"] for s in SYSTEMS[1:] if f"paired_{s}" in r["summary"]},
              **({"members": r["summary"]["members"]} if "members" in r["summary"] else {})}
             for name, r in zip(names, results)]
    result = {key: first[key] for key in same + ("recipe", "base")}
    result.update(command="python bench/spam_cv.py --combine " + " ".join(names), combined=seeds, per_fold=per_fold)
    result["summary"] = summary(per_fold)
    if (stable := always_wrong([r["per_fold"] for r in results], "gpt", SYSTEMS[1:])) is not None:
        result["summary"]["always_wrong"] = stable
    return result


def rescore(result: dict, name: str, work: Path) -> dict:
    """A run of an older spam_cv.py (no per-message lists) with its fold models still in `work` -> the same
    result with the lists added: each fold's scored checkpoint classifies its fold again and the baselines
    are refitted. Its figures must come out as recorded, else those are not the run's models."""
    from llmstages.config import load_recipe
    from llmstages.data.split import stratified_folds
    from llmstages.store import Store

    recipe = load_recipe(result["recipe"], result["overrides"])
    texts, labels = read_messages(Path(result["data"]), recipe)
    if len(texts) != result["messages"]:
        raise ValueError(f"{result['data']} now has {len(texts)} messages, {name} scored {result['messages']}")
    folds = stratified_folds(labels, texts, result["folds"], result["seed"])
    store = Store(work / "store")
    for row in result["per_fold"]:
        parts = fold_parts(texts, labels, folds, row["fold"], recipe)
        ref = f"cv-fold{row['fold']}@{row['gpt']['checkpoint_step']}"
        fresh = {"gpt": gpt_scored(store, ref, texts, labels, parts["test"]),
                 **baselines(texts, labels, parts, result["positive"])}
        for system in SYSTEMS:
            made, recorded = len(fresh[system]["wrong"]), row[system]["errors"]
            if made != recorded or (system == "gpt" and not np.isclose(fresh["gpt"]["roc_auc"],
                                                                       row["gpt"]["roc_auc"])):
                raise ValueError(f"fold {row['fold']}: {system} now makes {made} errors (GPT ROC AUC "
                                 f"{fresh['gpt']['roc_auc']:.6f}), {name} recorded {recorded} "
                                 f"({row['gpt']['roc_auc']:.6f}): {work} does not hold that run's models")
            row[system]["wrong"] = fresh[system]["wrong"]
        if members := member_scores(store, f"cv-fold{row['fold']}", texts, labels, parts["test"]):
            row["gpt"]["members"] = members
    result["rescored"] = f"python bench/spam_cv.py --rescore {name} --work {work}"
    result["summary"] = summary(result["per_fold"])
    return result


def merge(results: list[dict], names: list[str]) -> dict:
    """Runs of one setting on different folds (a `--only` screen, then the other folds) -> one result
    over all their folds, summarised as one run. Same data, fold assignment, recipe, base and overrides;
    no fold scored twice."""
    first = results[0]
    same = ("data", "messages", "positive", "folds", "seed", "recipe", "base", "overrides")
    require_same(results, names, same, "only runs of one setting can be merged")
    per_fold = sorted((row for r in results for row in r["per_fold"]), key=lambda row: row["fold"])
    scored = [row["fold"] for row in per_fold]
    if twice := sorted({f for f in scored if scored.count(f) > 1}):
        raise ValueError(f"fold(s) {', '.join(map(str, twice))} scored by more than one run")
    result = {key: first[key] for key in same}
    result.update(command="python bench/spam_cv.py --merge " + " ".join(names), scored_folds=scored,
                  merged=[{"file": name, "command": r["command"]} for name, r in zip(names, results)],
                  per_fold=per_fold)
    result["summary"] = summary(per_fold)
    return result


def print_table(result: dict) -> None:
    s = result["summary"]
    lines = [f"{'system':<12} " + " ".join(f"{k:>17}" for k in FIGURES)]
    for system in SYSTEMS:
        lines.append(f"{system:<12} " + " ".join(f"{s[system][k]['mean']:>8.4f} ± {s[system][k]['std']:<6.4f}"
                                                 for k in FIGURES))
    for other in SYSTEMS[1:]:
        d = s[f"gpt_minus_{other}"]
        lines.append(f"{'gpt-' + other:<12} "
                     + " ".join(f"{d[k]['mean']:>+8.4f} ± {d[k]['std']:<6.4f}" for k in FIGURES))
    for other in SYSTEMS[1:]:
        if t := s.get(f"paired_{other}"):
            lines.append(f"wrong only by gpt {t['gpt_only']}, only by {other} {t[other + '_only']}, by both "
                         f"{t['both']}: McNemar p = {t['mcnemar_p']:.3f}")
    for m in s.get("members", []):
        lines.append(f"member {m['member']} alone: {m['errors']} errors")
    print("\n".join(lines), file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides for the GPT runs")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--recipe", default="finetune-spam")
    parser.add_argument("--base", help="the base to fine-tune: a run name or checkpoint folder (default: the "
                                       "recipe's init_from)")
    parser.add_argument("--data", help=f"the labeled file (default: $LLMSTAGES_DATA/{DEFAULT_DATA})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    parser.add_argument("--work", help="store and fold files of the CV runs (default: store/spam-cv)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--only", default="", metavar="F,F",
                        help="run these folds only (0-based; a screen of settings; the summary covers them)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 folds, few steps, a tiny base")
    parser.add_argument("--combine", nargs="+", metavar="RUN.json",
                        help="train nothing: average the GPT figures of these runs (same folds, e.g. two seeds) "
                             "per fold and summarise them as one")
    parser.add_argument("--merge", nargs="+", metavar="RUN.json",
                        help="train nothing: join runs of one setting on different folds (--only) into one result")
    parser.add_argument("--rescore", metavar="RUN.json",
                        help="train nothing: add the per-message lists (and the paired tests) to a run of an older "
                             "version whose fold models are still in --work")
    args = parser.parse_args(argv)
    if sum(bool(x) for x in (args.combine, args.merge, args.rescore)) > 1:
        parser.error("--combine, --merge and --rescore: one at a time (merge each seed's folds, then combine the seeds)")
    if args.rescore:
        if args.overrides or args.only or args.quick or not args.work:
            parser.error("--rescore trains nothing: give the run's JSON file and the --work folder of its fold models")
        from llmstages.errors import UserError
        try:
            result = rescore(json.loads(Path(args.rescore).read_text()), args.rescore, Path(args.work))
        except (OSError, ValueError, KeyError, UserError) as err:
            parser.error(f"--rescore: {err}")
        return report(result, args.out)
    for option, join in (("combine", combine), ("merge", merge)):
        if names := getattr(args, option):
            if args.overrides or args.only or args.quick:
                parser.error(f"--{option} trains nothing: give the runs' JSON files alone (and --out)")
            try:
                result = join([json.loads(Path(name).read_text()) for name in names], names)
            except (OSError, ValueError, KeyError) as err:
                parser.error(f"--{option}: {err}")
            return report(result, args.out)
    if args.quick:
        args.folds = 2
        args.overrides = QUICK + args.overrides
    chosen = [int(f) for f in args.only.split(",") if f] or list(range(args.folds))
    if not set(chosen) <= set(range(args.folds)):
        parser.error(f"--only {args.only}: folds are 0..{args.folds - 1}")

    from llmstages.config import load_recipe
    from llmstages.data.split import stratified_folds
    from llmstages.runtime import set_threads
    from llmstages.store import Store, remove_dir

    set_threads()
    recipe = load_recipe(args.recipe, args.overrides)
    data_root = os.environ.get("LLMSTAGES_DATA") or str(HERE.parent.parent / "shared" / "data")
    path = Path(args.data or Path(data_root) / DEFAULT_DATA)
    texts, labels = read_messages(path, recipe)
    positive = recipe.classify.positive or (recipe.data.labels or sorted(set(labels)))[-1]
    folds = stratified_folds(labels, texts, args.folds, args.seed)

    work = Path(args.work or Path.cwd() / "store" / "spam-cv")
    if work.exists():
        remove_dir(work)  # every CV starts clean: runs are named by fold
    work.mkdir(parents=True)
    store = Store(work / "store")
    if args.base:
        base_ref = str(Store().resolve(args.base))
    elif args.quick:
        base_ref = tiny_base(store, texts)
    else:
        base_ref = str(Store().resolve(recipe.init_from))

    per_fold = []
    for fold in chosen:
        parts = fold_parts(texts, labels, folds, fold, recipe)
        print(f"fold {fold + 1}/{args.folds}: train {len(parts['train'])}, val {len(parts['val'])}, "
              f"test {len(parts['test'])}", file=sys.stderr, flush=True)
        row = {"fold": fold, "sizes": {k: int(len(v)) for k, v in parts.items()},
               "gpt": gpt_fold(texts, labels, parts, fold, args, store, base_ref, work),
               **baselines(texts, labels, parts, positive)}
        per_fold.append(row)
        print("  " + "  ".join(f"{s} acc {row[s]['accuracy']:.4f} f1 {row[s]['f1']:.4f}" for s in SYSTEMS),
              file=sys.stderr, flush=True)
    result = {"command": "python bench/spam_cv.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "data": str(path), "messages": len(texts), "positive": positive, "folds": args.folds,
              "scored_folds": chosen, "seed": args.seed, "recipe": args.recipe, "base": base_ref, "overrides": args.overrides, "per_fold": per_fold}
    result["summary"] = summary(per_fold)
    return report(result, args.out)


def report(result: dict, out: str | None) -> dict:
    """The table on stderr, the JSON on stdout (and in `out`)."""
    print_table(result)
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
