"""Shared core for federated class-incremental LoRA: data, tasks, model, metrics, results."""
