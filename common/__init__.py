"""quantlab's shared helpers: data loaders, checkpoints, device, meters, run logs, result records.

Kept thin on purpose: anything paper-specific (transforms, quantizers, models) lives in
the paper's own directory.

How a paper script uses it (checks before work, run directory, checkpoint identity, recipe, interrupt,
records, links to the original's paths): common/README.md; apot/CIFAR10/main.py is the shortest example.
"""
from common.paths import REPO_ROOT  # noqa: F401  (re-exported: `from common import REPO_ROOT`)
