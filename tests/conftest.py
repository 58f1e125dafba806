"""Shared fixtures: composed configs and small experiments."""

from __future__ import annotations

import pytest

from fedcil.config import compose_config

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def cfg():
    """The quickstart config (digits, 5 tasks x 2 classes, 5 clients, micro ViT)."""
    return compose_config("config", [])
