"""Inference: batch forecasts from many start dates (``weathermodel forecast``)."""
