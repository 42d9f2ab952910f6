"""Forecaster models: a multi-mesh graph network and a weather transformer behind one
one-step interface (:class:`~weathermodel.models.forecaster.Forecaster`).

Models import from ``conventions``, ``configuration`` and ``data`` only, never from training,
inference, evaluation or the CLI (``tests/test_models.py`` checks the import graph).
"""
