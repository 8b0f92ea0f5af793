"""Training: the loop every training script runs (`loop.py`), the optimizer and LR schedule (`solver.py`),
checkpoints (`checkpoint.py`), precise BN (`precise_bn.py`) and the metrics log (`run_log.py`)."""
