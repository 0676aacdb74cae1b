"""quantlab's shared helpers: data loaders, checkpoints, device, meters, run logs, result records.

Kept thin on purpose: anything paper-specific (transforms, quantizers, models) lives in
the paper's own directory.

How a paper script uses it (checks before work, run directory, checkpoint identity, recipe, interrupt,
records, links to the original's paths): common/README.md; apot/CIFAR10/main.py is the shortest example.
"""
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
