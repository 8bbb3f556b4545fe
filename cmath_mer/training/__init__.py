"""Training and evaluating CMATH: the training step and loop, evaluation and prediction, run folders and
checkpoints, weight averaging, multi-process training, seeds and sweeps, the context-free baseline, metrics."""
