"""Every location quantlab resolves, and the environment variable that moves each one:

    REPO_ROOT        the checkout
    runs_root()      $QUANTLAB_RUNS, else <checkout>/runs            run directories (common.runs)
    results_dir()    $QUANTLAB_RESULTS, else $RESULTS_DIR (the older name), else <checkout>/results
    reference_dir()  $QUANTLAB_REFERENCE, else <checkout>/results/reference   committed records
    cache_dir()      $QUANTLAB_CACHE, else ~/.cache/quantlab         decoded datasets, built helpers
    data_root()      $QUANTLAB_DATA, else ./data                     every script's default data root
    SHARED_DIR       <checkout>/../shared                            data and weights shared by checkouts

Only the standard library, and no other common module: every other module may import this one, so the
modules that need a location never import one another for it. Each function reads the environment when
called (a test or a script may set a variable after import).
"""
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DIR = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared"))

RUNS_ENV = "QUANTLAB_RUNS"
RESULTS_ENV = ("QUANTLAB_RESULTS", "RESULTS_DIR")     # the first one set wins; RESULTS_DIR is the older name
REFERENCE_ENV = "QUANTLAB_REFERENCE"
CACHE_ENV = "QUANTLAB_CACHE"
DATA_ENV = "QUANTLAB_DATA"

REFERENCE_DIR = os.path.join(REPO_ROOT, "results", "reference")   # committed records (QUANTLAB_REFERENCE moves it)


def runs_root():
    return os.environ.get(RUNS_ENV) or os.path.join(REPO_ROOT, "runs")


def results_env():
    """(variable, value) of the environment variable that moves results/, or (None, None)."""
    for k in RESULTS_ENV:
        if os.environ.get(k):
            return k, os.environ[k]
    return None, None


def results_dir():
    return results_env()[1] or os.path.join(REPO_ROOT, "results")


def reference_dir():
    return os.environ.get(REFERENCE_ENV) or REFERENCE_DIR


def cache_dir():
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "quantlab")


def data_root(fallback="./data"):
    """Every script's default data root: $QUANTLAB_DATA, else ./data (one rule for the scripts and the Makefile).
    A data root may hold several datasets side by side (MNIST/, cifar10/ or cifar-10-batches-py/, ...)."""
    return os.environ.get(DATA_ENV) or fallback
