"""AlignQ CDF alignment, dann_digit (the original's cdf_alignment/dann_digit/main.py); flags: alignq/options.py."""
from alignq.engine import main

if __name__ == "__main__":
    main("dann_digit")
