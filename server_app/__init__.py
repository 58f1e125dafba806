"""Flower ServerApp: the task/round loop, evaluation and results files."""
