"""AlignQ CDF alignment + ADMM correlation preservation, resnet-56-cifar-10 (the original's cdf_alignment_admm/resnet-56-cifar-10/main.py)."""
from alignq.engine import main

if __name__ == "__main__":
    main("resnet-56-cifar-10", admm=True)
