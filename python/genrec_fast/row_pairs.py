"""Sparse per-row pairs: the distinct (row, column) pairs of tables such as a batch's biased items (B, S), -1 = none,
kept sorted as keys row * width + column, with per-pair sums, lookups and a padded (rows, pairs per row) layout.
The sampled softmax's per-row classes (loss.py) and calibration's biased candidates (calibrate.py) use it."""
from __future__ import annotations

import torch


class RowPairs:
    def __init__(self, tables: list, width: int):
        """tables: (R, S_t) int64 column tables (-1 = none) of the same R rows; width: every column < width."""
        self.rows_n, self.width = tables[0].shape[0], width
        rows = torch.arange(self.rows_n, device=tables[0].device)[:, None]  # (R, 1)
        self.keys = torch.unique(torch.cat([(rows * width + t)[t >= 0] for t in tables]))  # (Q,) sorted
        self.row, self.col = self.keys // width, self.keys % width  # (Q,) each pair's row and column
        count = torch.bincount(self.row, minlength=self.rows_n)  # (R,)
        self.slot = torch.arange(len(self.keys), device=self.keys.device) - (torch.cumsum(count, 0) - count)[self.row]
        self.slots = int(count.max()) if len(self.keys) else 0  # the padded layout's width
        self.count = count

    def find(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs (rows, cols) of any one shape -> (their index among the keys, whether they are pairs)."""
        key = rows * self.width + cols
        if not len(self.keys):
            return torch.zeros_like(key), torch.zeros_like(key, dtype=torch.bool)
        at = torch.searchsorted(self.keys, key).clamp_max(len(self.keys) - 1)
        return at, (self.keys[at] == key) & (cols >= 0)

    def sums(self, table: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """values (R, S) at the columns of table (R, S) (-1 = none; every other entry a pair) -> (Q,) summed per
        pair (differentiable in values)."""
        rows = torch.arange(self.rows_n, device=table.device)[:, None].expand_as(table)
        on = table >= 0
        at, _ = self.find(rows[on], table[on])
        return values.new_zeros(len(self.keys)).index_add(0, at, values[on])

    def padded(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """(..., Q) per-pair values -> (..., R, slots): each row's pairs in column order, `fill` after them."""
        out = values.new_full(values.shape[:-1] + (self.rows_n, self.slots), fill)
        out[..., self.row, self.slot] = values
        return out
