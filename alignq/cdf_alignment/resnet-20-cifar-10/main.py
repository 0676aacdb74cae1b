"""AlignQ CDF alignment, resnet-20-cifar-10 (the original's cdf_alignment/resnet-20-cifar-10/main.py); flags: alignq/options.py."""
from alignq.engine import main

if __name__ == "__main__":
    main("resnet-20-cifar-10")
