"""Flower ClientApp: local LoRA training on this SuperNode's share of the current task."""
