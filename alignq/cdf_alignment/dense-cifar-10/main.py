"""AlignQ CDF alignment, dense-cifar-10 (the original's cdf_alignment/dense-cifar-10/main.py); flags: alignq/options.py."""
from alignq.engine import main

if __name__ == "__main__":
    main("dense-cifar-10")
