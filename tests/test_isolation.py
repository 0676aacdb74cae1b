"""Tests never write into the repository's results/ or runs/: also not from module-scoped fixtures, which run
before any per-test fixture (a module fixture of test_alq_interrupt.py once appended its 40-image records to the
developer's results/alq.jsonl)."""
import os

import pytest

from common import REPO_ROOT

KEYS = ("RESULTS_DIR", "QUANTLAB_RUNS", "QUANTLAB_REFERENCE")


@pytest.fixture(scope="module")
def module_env():
    return {k: os.environ.get(k) for k in KEYS}


def test_module_scoped_fixtures_already_see_temporary_results_and_runs(module_env):
    for k, v in module_env.items():
        assert v is not None, k
        assert not os.path.realpath(v).startswith(os.path.realpath(REPO_ROOT) + os.sep), (k, v)
