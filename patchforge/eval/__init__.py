"""Evaluation: generation, prompt rows, statistics, judges, reports and attacks."""
