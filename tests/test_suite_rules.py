"""The suite's own rules: in CI (.ci/run) a missing test dependency or data file fails instead of skipping."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

NEEDS = '''
from conftest import need_data, need_module

def test_needs_a_package():
    need_module("llmstages_no_such_package")

def test_needs_a_file():
    need_data("no/such/file.txt")
'''


@pytest.mark.parametrize("flags,outcome", [({}, "2 skipped"),
                                           ({"LLMSTAGES_REQUIRE_TEST_DEPS": "1"}, "1 failed, 1 skipped"),
                                           ({"LLMSTAGES_REQUIRE_TEST_DEPS": "1", "LLMSTAGES_REQUIRE_TEST_DATA": "1"},
                                            "2 failed")])
def test_missing_dependency_or_data_skips_locally_and_fails_in_ci(tmp_path, flags, outcome):
    (tmp_path / "test_needs.py").write_text(NEEDS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSTAGES_REQUIRE_")}
    env.update(flags, PYTHONPATH=str(TESTS))  # conftest.need_* as the real tests import them
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                             "--rootdir", str(tmp_path), str(tmp_path / "test_needs.py")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert outcome in result.stdout, result.stdout[-2000:]
    assert ("llmstages_no_such_package" in result.stdout) == bool(flags)  # the failure names what is missing


def test_ci_sets_both_flags():
    ci = (TESTS.parent / ".ci" / "run").read_text()
    assert "export LLMSTAGES_REQUIRE_TEST_DATA=1" in ci and "export LLMSTAGES_REQUIRE_TEST_DEPS=1" in ci
