"""Planner test fixtures (factories live in tests/planner/factories.py)."""

from __future__ import annotations

import pytest

from tests.planner.factories import preset


@pytest.fixture
def exact_preset():
    return preset()


@pytest.fixture
def knapsack_preset():
    return preset(formulation="knapsack")
