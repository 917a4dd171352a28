"""Training code for VSCochleaSeg models: data preparation, nnU-Net-style trainers and model export.

Run from the repository root (``python -m training.<module>``); the engine package must be installed
(``pip install -e .``). Everything a run needs is in a config file (``training/configs/*.json``),
which is printed and saved with every run.
"""
