"""benchmarks/relations_probe.py's reading of held-out relation words: the table counts what a probe reads per
relation asked."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from relations_probe import RELATIONS, fit, read_as  # noqa: E402


def test_read_as_counts_each_reading_per_relation_asked():
    y = torch.tensor([0, 0, 1, 2, 3, 3])
    read = torch.tensor([0, 1, 1, 1, 1, 3])  # "above" read as "right of", one "below" too
    table = read_as(lambda x: read, torch.zeros(6, 2), y)
    assert list(table) == list(RELATIONS)
    assert table["left of"] == {"left of": 1, "right of": 1, "above": 0, "below": 0}
    assert table["above"]["right of"] == 1 and table["below"] == {"left of": 0, "right of": 1, "above": 0, "below": 1}
    assert sum(sum(row.values()) for row in table.values()) == 6


def test_fit_reads_separable_features():
    torch.manual_seed(0)
    y = torch.arange(4).repeat(25)
    x = torch.nn.functional.one_hot(y, 4).float() * 3 + 0.1 * torch.randn(100, 4)
    predict = fit(x, y)
    assert torch.equal(predict(x), y)
    assert read_as(predict, x, y)["below"]["below"] == 25
