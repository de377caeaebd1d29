"""Experiment drivers built on the library: the main demo, the different-initialisation
scenario, the weight-averaging diagnostics on digits, and their training loops.

Run them as ``python -m merging.experiments.demo``, ``python -m merging.experiments.scenarios``
and ``merging diagnose`` (or ``python -m merging.experiments.diagnostics``). The library
(every other module of ``merging``) does not import this package; only the command line's
``diagnose`` dispatch reaches it.
"""
