"""Shared fixtures: composed configs and small experiments."""

from __future__ import annotations

import pytest

from fedcil.config import compose_config


@pytest.fixture
def cfg():
    """The quickstart config (digits, 5 tasks x 2 classes, 5 clients, micro ViT)."""
    return compose_config("config", [])
