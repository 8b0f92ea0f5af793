"""Research tools around the detector: the paper's experiment grid and its figures (`experiments.py`,
`collect.py`), classification pre-training of a backbone (`classification.py`), drawing detections
(`visualize.py`)."""
