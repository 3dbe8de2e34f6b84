"""The benchmarks fail loudly: missing data is an error (never random data), a failing benchmark fails
`make bench`, and the output goes to an ignored folder, not a tracked file. Nothing here is timed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench(*args: str, env_data: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_data is not None:
        env["LLMSTAGES_TEST_DATA"] = env_data
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=BENCH.parent)


def test_missing_data_is_an_error_naming_the_file(tmp_path):
    for script, wanted in (("bench_train.py", "tinyshakespeare.txt"), ("bench_classify.py", "SMSSpamCollection.tsv"),
                           ("bench_prepare.py", "gutenberg"), ("bench_packing.py", "instruction-data.json")):
        result = bench(str(BENCH / script), "--data", str(tmp_path / "nowhere"))
        assert result.returncode == 2, (script, result.stderr[-2000:])
        assert f"{tmp_path / 'nowhere'}" in result.stderr and wanted in result.stderr, script
        assert "never fall back" in result.stderr
    # the same rule without --data: $LLMSTAGES_TEST_DATA
    result = bench(str(BENCH / "bench_classify.py"), env_data=str(tmp_path / "elsewhere"))
    assert result.returncode == 2 and str(tmp_path / "elsewhere") in result.stderr


def test_run_all_fails_when_a_benchmark_fails_and_writes_outside_tracked_files(tmp_path):
    out = tmp_path / "bench.json"
    result = bench(str(BENCH / "run_all.py"), "--only", "classify", "--data", str(tmp_path / "nowhere"),
                   "--out", str(out))
    assert result.returncode == 1 and "bench: FAILED: classify" in result.stderr
    figures = json.loads(out.read_text())["benchmarks"]["classify"]
    assert figures["returncode"] == 2 and any("SMSSpamCollection.tsv" in line for line in figures["error"])
    unknown = bench(str(BENCH / "run_all.py"), "--only", "nosuch", "--out", str(out))
    assert unknown.returncode == 2 and "unknown benchmark(s) nosuch" in unknown.stderr
    source = (BENCH / "run_all.py").read_text()
    assert 'default=str(HERE / "results" / "bench.json")' in source  # bench/results/ is in .gitignore
    assert "/bench/results/" in (BENCH.parent / ".gitignore").read_text().splitlines()


def test_generate_benchmark_runs_on_tiny_settings():
    result = bench(str(BENCH / "bench_generate.py"), "--size", "tiny", "--new-tokens", "4", "--prompt-tokens", "4",
                   "--repeats", "1", "--vocab-size", "300")
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "generate" and figures["new_tokens"] == 4
    assert figures["tokens_per_s_with_cache"] > 0 and figures["tokens_per_s_without_cache"] > 0


def gpu_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(BENCH / "gpu_check.sh"), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_gpu_check_refuses_a_cpu_without_cpu_smoke_and_unknown_parts(tmp_path):
    assert gpu_check().returncode == 2 and "usage: bench/gpu_check.sh OUT_DIR" in gpu_check().stderr
    no_gpu = gpu_check(str(tmp_path / "out"))
    assert no_gpu.returncode == 2 and "no CUDA device here: run with --cpu-smoke" in no_gpu.stderr
    unknown = gpu_check(str(tmp_path / "out"), "--cpu-smoke", "--only", "env,warp")
    assert unknown.returncode == 2 and "unknown parts ['warp']" in unknown.stderr
    missing = gpu_check(str(tmp_path / "out"), "--cpu-smoke", "--data", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and f"{tmp_path / 'nowhere' / 'gutenberg'} is missing" in missing.stderr


@pytest.mark.slow  # prepare and three pretrain processes: about 40 s on 2 busy cores
def test_gpu_check_cpu_smoke_kills_and_resumes_exactly(data_file, tmp_path):
    """The script's resume part on a CPU: the killed-and-resumed run logs the straight run's losses
    bitwise (as the loop promises on a CPU), and every part's figures land in one JSON file."""
    shared = data_file("gutenberg/pg1184_count_of_monte_cristo.txt").parent.parent
    data = tmp_path / "data"
    (data / "gutenberg").mkdir(parents=True)
    (data / "gutenberg" / "book.txt").symlink_to(shared / "gutenberg" / "pg1184_count_of_monte_cristo.txt")
    for name in ("gpt2-tokenizer", "sms_spam", "instruction-data.json"):
        (data / name).symlink_to(shared / name)
    out = tmp_path / "out"
    result = gpu_check(str(out), "--cpu-smoke", "--only", "env,prepare,resume", "--data", str(data),
                       "--work", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((out / "gpu_check.json").read_text())
    assert figures["env"]["mode"] == "cpu-smoke" and figures["env"]["device"] == "cpu"
    resume = figures["resume"]
    assert resume["killed_while_at_step"] > resume["checkpoint_step"] == 10
    assert resume["bitwise_equal"] and resume["max_abs_loss_diff_after_resume"] == 0.0
    assert "part resume" in (out / "gpu_check.log").read_text()


@pytest.mark.slow  # three processes import torch: about 30 s on 2 busy cores
def test_packing_benchmark_runs_on_tiny_settings(data_file):
    data = data_file("instruction-data.json").parent
    data_file("gpt2-tokenizer")
    result = bench(str(BENCH / "bench_packing.py"), "--size", "tiny", "--steps", "2", "--warmup", "1", "--rounds", "1",
                   "--examples", "64", "--micro-batch", "4", "--vocab-size", "512", "--data", str(data))
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    padded, packed = figures["variants"]["padded"], figures["variants"]["packed"]
    assert figures["benchmark"] == "packing" and figures["block_size"] == 128 and set(figures["speedup"]) == {
        "tokens_per_s", "examples_per_s"}
    # 4 rows of up to 128 tokens hold about two of these 41-92 token examples each
    assert padded["examples_per_step"] == 4 and packed["examples_per_step"] > 6
    assert padded["training_examples"] == packed["training_examples"] == 64
    assert all(0 <= v["padding_share"] < 0.5 and v["tokens_per_s"] > 0 for v in (padded, packed))


def test_browse_benchmark_runs_on_tiny_settings(tmp_path):
    result = bench(str(BENCH / "bench_browse.py"), "--store", str(tmp_path / "none"), "--repeats", "1")
    assert result.returncode != 0 and "no runs in" in result.stderr  # an empty store is an error, not 0 s
    assert '"browse": ["bench_browse.py"]' in (BENCH / "run_all.py").read_text()  # part of make bench
    result = bench(str(BENCH / "bench_browse.py"), "--runs", "2", "--repeats", "1", "--store", "",
                   timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "browse" and set(figures["commands"]) == {"runs", "show", "recipes", "help"}
    assert not any(f["imports_torch"] for f in figures["commands"].values())


@pytest.mark.slow
def test_memory_benchmark_runs_on_tiny_settings():
    result = bench(str(BENCH / "bench_memory.py"), "--n-layer", "2", "--n-embd", "64", "--block-size", "32",
                   "--micro-batch", "2", "--vocab-size", "256", "--steps", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "memory" and list(figures["variants"]) == ["ddp", "fsdp", "fsdp+ac"]
    for variant in figures["variants"].values():
        assert [r["rank"] for r in variant["ranks"]] == [0, 1]
        assert variant["max_train_peak_rss_mib"] > 0
    # the same model on the same tokens: every variant ends at the same loss on each rank
    losses = {name: [r["loss"] for r in v["ranks"]] for name, v in figures["variants"].items()}
    assert losses["fsdp"] == pytest.approx(losses["ddp"], abs=1e-3) and losses["fsdp+ac"] == pytest.approx(
        losses["ddp"], abs=1e-3)


@pytest.mark.slow  # one fold of a tiny model, DAPT included: about 20 s
def test_spam_cv_scores_the_chosen_folds_against_both_baselines(data_file, tmp_path):
    sms = data_file("sms_spam/SMSSpamCollection.tsv")
    result = bench(str(BENCH / "spam_cv.py"), "--quick", "--only", "1", "--data", str(sms),
                   "--work", str(tmp_path / "cv"), "--out", str(tmp_path / "cv.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures == json.loads((tmp_path / "cv.json").read_text())
    assert figures["folds"] == 2 and figures["scored_folds"] == [1] and figures["messages"] == 4738
    (fold,) = figures["per_fold"]
    # the held-out fold is half of the messages; the other half is split into training and validation parts
    assert fold["fold"] == 1 and sum(fold["sizes"].values()) == 4738 and abs(fold["sizes"]["test"] - 2369) <= 20
    for system in ("gpt", "char_svm", "word_lr"):
        assert 0.5 < fold[system]["accuracy"] <= 1 and fold[system]["errors"] == round(
            (1 - fold[system]["accuracy"]) * fold["sizes"]["test"])
    assert figures["summary"]["gpt_minus_char_svm"]["accuracy"]["per_fold"] == [
        fold["gpt"]["accuracy"] - fold["char_svm"]["accuracy"]]
    # each system's wrong messages, by index into the file: all in the held-out fold, as many as its errors
    lines = sms.read_text(encoding="utf-8").splitlines()
    for system in ("gpt", "char_svm", "word_lr"):
        assert len(fold[system]["wrong"]) == fold[system]["errors"] == len(set(fold[system]["wrong"]))
        assert all(0 <= i < len(lines) for i in fold[system]["wrong"])
    paired = figures["summary"]["paired_char_svm"]
    gpt, svm = set(fold["gpt"]["wrong"]), set(fold["char_svm"]["wrong"])
    # the shipped recipe is an ensemble: each member is also scored alone on the fold, as its run chose
    members = fold["gpt"]["members"]
    assert [m["run"] for m in members] == ["cv-fold1-member1", "cv-fold1-member2", "cv-fold1-member3"]
    assert all(m["errors"] == len(m["wrong"]) and set(m["wrong"]) <= set(range(len(lines))) for m in members)
    assert [m["errors"] for m in figures["summary"]["members"]] == [m["errors"] for m in members]
    assert figures["summary"]["members"][0]["paired_char_svm"]["member_only"] == len(set(members[0]["wrong"]) - svm)
    assert (paired["gpt_only"], paired["char_svm_only"], paired["both"]) == (len(gpt - svm), len(svm - gpt),
                                                                            len(gpt & svm))
    # --rescore: the same folds scored again from the kept fold models gives the same lists back
    older = json.loads((tmp_path / "cv.json").read_text())
    for system in ("gpt", "char_svm", "word_lr"):
        del older["per_fold"][0][system]["wrong"]
    del older["per_fold"][0]["gpt"]["members"]
    (tmp_path / "old.json").write_text(json.dumps(older))
    again = bench(str(BENCH / "spam_cv.py"), "--rescore", str(tmp_path / "old.json"), "--work", str(tmp_path / "cv"))
    assert again.returncode == 0, again.stderr[-2000:]
    rescored = json.loads(again.stdout.strip().splitlines()[-1])
    assert rescored["per_fold"] == figures["per_fold"] and rescored["summary"] == figures["summary"]
    # ... and refuses figures its models do not reproduce
    older["per_fold"][0]["gpt"]["errors"] += 1
    (tmp_path / "other.json").write_text(json.dumps(older))
    wrong = bench(str(BENCH / "spam_cv.py"), "--rescore", str(tmp_path / "other.json"), "--work", str(tmp_path / "cv"))
    assert wrong.returncode == 2 and "does not hold that run's models" in wrong.stderr
    bad = bench(str(BENCH / "spam_cv.py"), "--quick", "--only", "2", "--data", str(sms), "--work", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--only 2: folds are 0..1" in bad.stderr and not (tmp_path / "x").exists()


def test_spam_train_benchmark_compares_padded_and_packed_batches(data_file):
    root = data_file("sms_spam/SMSSpamCollection.tsv").parents[1]
    result = bench(str(BENCH / "bench_spam_train.py"), "--quick", "--data", str(root))
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    padded, packed = figures["variants"]["padded"], figures["variants"]["packed"]
    assert figures["steps"] == 6 and len(padded["train_seconds"]) == len(packed["train_seconds"]) == 1
    # the same texts in fewer, fuller rows: fewer positions per real token (1.0 = no padding)
    assert 1.0 <= packed["positions_per_token"] < padded["positions_per_token"]
    assert figures["packed_speedup"] == pytest.approx(padded["median_s"] / packed["median_s"], rel=0.02)
    assert "cpu_fast_bf16" in figures["machine"]


def test_paired_comparison_counts_the_messages_only_one_system_gets_wrong():
    sys.path.insert(0, str(BENCH))
    try:
        from cv_paired import always_wrong, mcnemar_p, paired
    finally:
        sys.path.remove(str(BENCH))
    # exact two-sided binomial: 0 against 6 is 2 / 2**6; the test is symmetric; no discordant message: 1
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64) and mcnemar_p(6, 0) == mcnemar_p(0, 6)
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0 and mcnemar_p(9, 22) == pytest.approx(0.0294, abs=1e-4)
    folds = [{"gpt": {"wrong": [1, 2]}, "svm": {"wrong": [2, 3, 4]}}, {"gpt": {"wrong": [7]}, "svm": {"wrong": []}}]
    assert paired(folds, "gpt", "svm") == {"gpt_only": 2, "svm_only": 2, "both": 1, "mcnemar_p": 1.0}
    assert paired([{"gpt": {"errors": 1}, "svm": {"wrong": []}}], "gpt", "svm") is None  # an older result
    seed2 = [{"gpt": {"wrong": [2, 5]}, "svm": {"wrong": [2, 3, 4]}}, {"gpt": {"wrong": [7]}, "svm": {"wrong": []}}]
    # messages 2 and 7 are wrong in both runs; of those, the svm also misses 2
    assert always_wrong([folds, seed2], "gpt", ("svm",)) == {"gpt_every_run": 2, "gpt_some_run": 4, "also_svm": 1}


def _cv_run(gpt_accuracy: list[float], seed: int, svm_accuracy: float = 0.99) -> dict:
    """A spam_cv.py result of 2 folds of 100 messages (only the figures --combine reads)."""
    def figures(acc: float) -> dict:
        return {"accuracy": acc, "precision": acc, "recall": acc, "f1": acc, "errors": round((1 - acc) * 100)}
    per_fold = [{"fold": f, "sizes": {"train": 180, "val": 20, "test": 100},
                 "gpt": dict(figures(a), roc_auc=a), "char_svm": figures(svm_accuracy), "word_lr": figures(0.95)}
                for f, a in enumerate(gpt_accuracy)]
    common = {"data": "sms.tsv", "messages": 200, "positive": "spam", "folds": 2, "scored_folds": [0, 1],
              "seed": 0, "recipe": "finetune-spam", "base": "base", "overrides": [f"train.seed={seed}"],
              "command": f"python bench/spam_cv.py train.seed={seed}"}
    means = {k: {"mean": sum(f["gpt"][k] for f in per_fold) / len(per_fold)}
             for k in ("accuracy", "precision", "recall", "f1", "errors")}
    return dict(common, per_fold=per_fold, summary={"gpt": means})


def test_spam_cv_combines_seeds_per_fold_and_refuses_other_folds(tmp_path):
    ensemble = _cv_run([0.98, 0.99], 0)
    ensemble["summary"]["members"] = [{"member": 1, "errors": 4}, {"member": 2, "errors": 2}]  # a soup or ensemble
    (tmp_path / "s0.json").write_text(json.dumps(ensemble))
    (tmp_path / "s1.json").write_text(json.dumps(_cv_run([0.99, 1.00], 1)))
    result = bench(str(BENCH / "spam_cv.py"), "--combine", str(tmp_path / "s0.json"), str(tmp_path / "s1.json"),
                   "--out", str(tmp_path / "both.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    both = json.loads((tmp_path / "both.json").read_text())
    # each run's members alone are kept with its entry (per fold they are not averaged across runs)
    assert both["combined"][0]["members"] == ensemble["summary"]["members"] and "members" not in both["combined"][1]
    # per fold the mean of the two seeds (0.985, 0.995), then mean and spread over the folds
    assert [f["gpt"]["accuracy"] for f in both["per_fold"]] == pytest.approx([0.985, 0.995])
    assert both["summary"]["gpt"]["accuracy"]["mean"] == pytest.approx(0.99)
    assert both["summary"]["gpt"]["accuracy"]["std"] == pytest.approx(0.01 / 2 ** 0.5)
    assert both["summary"]["gpt_minus_char_svm"]["accuracy"]["per_fold"] == pytest.approx([-0.005, 0.005])
    assert [s["accuracy"] for s in both["combined"]] == pytest.approx([0.985, 0.995])
    # a run whose baselines differ was not made on the same folds
    (tmp_path / "other.json").write_text(json.dumps(_cv_run([0.99, 0.99], 2, svm_accuracy=0.97)))
    bad = bench(str(BENCH / "spam_cv.py"), "--combine", str(tmp_path / "s0.json"), str(tmp_path / "other.json"),
                "--out", str(tmp_path / "no.json"))
    assert bad.returncode == 2 and "baselines of fold 0 differ" in bad.stderr and not (tmp_path / "no.json").exists()
    missing = bench(str(BENCH / "spam_cv.py"), "--combine", str(tmp_path / "s0.json"), str(tmp_path / "gone.json"))
    assert missing.returncode == 2 and "gone.json" in missing.stderr
    # overrides or a fold screen would be silently ignored: refused
    mixed = bench(str(BENCH / "spam_cv.py"), "train.seed=3", "--combine", str(tmp_path / "s0.json"))
    assert mixed.returncode == 2 and "trains nothing" in mixed.stderr


def test_spam_cv_merges_runs_of_other_folds_and_refuses_a_fold_twice(tmp_path):
    """--merge joins a --only screen and the rest of the folds (one setting) into one 5-fold result."""
    screen, rest = _cv_run([0.98, 0.99], 0), _cv_run([0.97], 0)
    rest["per_fold"][0]["fold"], rest["scored_folds"] = 2, [2]
    (tmp_path / "f01.json").write_text(json.dumps(screen))
    (tmp_path / "f2.json").write_text(json.dumps(rest))
    result = bench(str(BENCH / "spam_cv.py"), "--merge", str(tmp_path / "f2.json"), str(tmp_path / "f01.json"),
                   "--out", str(tmp_path / "all.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    joined = json.loads((tmp_path / "all.json").read_text())
    assert joined["scored_folds"] == [0, 1, 2] and joined["overrides"] == ["train.seed=0"]
    assert [f["gpt"]["accuracy"] for f in joined["per_fold"]] == pytest.approx([0.98, 0.99, 0.97])
    assert joined["summary"]["gpt"]["accuracy"]["mean"] == pytest.approx(0.98)
    assert joined["summary"]["gpt"]["accuracy"]["std"] == pytest.approx(0.01)
    twice = bench(str(BENCH / "spam_cv.py"), "--merge", str(tmp_path / "f01.json"), str(tmp_path / "f01.json"))
    assert twice.returncode == 2 and "fold(s) 0, 1 scored by more than one run" in twice.stderr
    (tmp_path / "s1.json").write_text(json.dumps(dict(rest, overrides=["train.seed=1"])))
    other = bench(str(BENCH / "spam_cv.py"), "--merge", str(tmp_path / "f01.json"), str(tmp_path / "s1.json"))
    assert other.returncode == 2 and "only runs of one setting can be merged" in other.stderr
    both = bench(str(BENCH / "spam_cv.py"), "--merge", str(tmp_path / "f01.json"), "--combine", str(tmp_path / "f2.json"))
    assert both.returncode == 2 and "one at a time" in both.stderr


def test_plot_recipes_draws_the_bench_json(tmp_path):
    curve = [[30.0, 2.4], [60.0, 2.2]]
    result = {"clock": "steps", "machine": {"cores": 2, "precision": "fp32"},
              "target": {"recipe": "gpt2", "budget_s": 60.0, "val_bpb": 2.3},
              "recipes": {name: {"runs": {"30s": [{"curve": curve[:1]}], "60s": [{"curve": curve}, {"curve": []}]}}
                          for name in ("gpt2", "modern")}}
    (tmp_path / "r.json").write_text(json.dumps(result))
    out = tmp_path / "plots" / "r.png"
    done = bench(str(BENCH / "plot_recipes.py"), str(tmp_path / "r.json"), "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
