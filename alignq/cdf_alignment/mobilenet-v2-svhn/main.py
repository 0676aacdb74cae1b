"""AlignQ CDF alignment, mobilenet-v2-svhn (the original's cdf_alignment/mobilenet-v2-svhn/main.py); flags: alignq/options.py."""
from alignq.engine import main

if __name__ == "__main__":
    main("mobilenet-v2-svhn")
