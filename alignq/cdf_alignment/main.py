"""AlignQ short form: `python3 main.py <the README flags>`; the experiment follows from --experiment or the
model/data flags (alignq/options.py: infer_experiment). Add --admm for correlation preservation."""
from alignq.engine import main

if __name__ == "__main__":
    main()
