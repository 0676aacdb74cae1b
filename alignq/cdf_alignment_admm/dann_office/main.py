"""AlignQ CDF alignment + ADMM correlation preservation, dann_office (the original's cdf_alignment_admm/dann_office/main.py)."""
from alignq.engine import main

if __name__ == "__main__":
    main("dann_office", admm=True)
