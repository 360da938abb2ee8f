"""The reference training run: ``python -m vaultkern train`` (and the demo behind ``make demo``).

* :mod:`~vaultkern.run.cli` — the command line: flags, their checks, resuming a run's settings;
* :mod:`~vaultkern.run.budget` — the plan fixed before training: steps, σ, the ε budget,
  δ against 1/N, and the document-level ε derived after training;
* :mod:`~vaultkern.run.rundir` — the run directory: file names, checkpoints and their resume
  claims, metrics, loading a trained model (what ``audit`` and ``generate`` import);
* :mod:`~vaultkern.run.batches` — logical batches, padding rows and micro-batch backward;
* :mod:`~vaultkern.run.loop` — the training loop;
* :mod:`~vaultkern.run.demo` — train with and without DP, audit both, compare.
"""
