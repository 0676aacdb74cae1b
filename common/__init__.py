"""quantlab's shared helpers: data loaders, checkpoints, device, meters, run logs, result records.

Kept thin on purpose: anything paper-specific (transforms, quantizers, models) lives in
the paper's own directory.
"""
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
