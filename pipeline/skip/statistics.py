"""Per-tensor weight statistics of one side's layers, with the epoch-start snapshots the update norms need."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from pipeline.skip.decisions import LayerStat, ParamStat

__all__ = ["LayerStatistics"]


def _flat(params: list[nn.Parameter]) -> torch.Tensor:
    # torch.cat always copies, so the result is safe to keep as a snapshot.
    return torch.cat([p.detach().reshape(-1).float() for p in params])


class LayerStatistics:
    """Per-side collector: keeps a float32 snapshot of its layers' parameters at each epoch start.

    Every layer with parameters reports every tensor (frozen ones too: CAC reads them all).
    Build it after the model is on its device and before the first step of an epoch.
    """

    def __init__(self, layers: nn.Sequential, offset: int) -> None:
        self._layers: list[tuple[int, list[nn.Parameter]]] = []
        for position, layer in enumerate(layers):
            params = list(layer.parameters())
            if params:
                self._layers.append((offset + position, params))
        self._snapshots = {index: _flat(params) for index, params in self._layers}

    def collect(self, *, epoch_end: bool) -> list[LayerStat]:
        """Statistics of this side's layers with parameters; at an epoch end also each tensor's epoch update norm.

        At an epoch end the snapshot is retaken, so the next epoch's update starts here.
        """
        if not self._layers:
            return []
        rows = []
        for index, params in self._layers:
            flat = _flat(params)
            if epoch_end:
                update = flat - self._snapshots[index].to(flat.device)
                self._snapshots[index] = flat
            start = 0
            for p in params:
                values = flat[start:start + p.numel()]
                # A single element has no unbiased variance (NaN); report 0 instead.
                variance = torch.var(values) if values.numel() > 1 else values.new_zeros(())
                row = [torch.linalg.vector_norm(values), variance]
                if epoch_end:
                    row.append(torch.linalg.vector_norm(update[start:start + p.numel()]))
                rows.append(torch.stack(row))
                start += p.numel()
        values = iter(torch.stack(rows).tolist())  # one device sync for all tensors
        stats = []
        for index, params in self._layers:
            tensors = []
            for p in params:
                row = next(values)
                tensors.append(ParamStat(tuple(p.shape), row[0], row[1], row[2] if epoch_end else None))
            stats.append(LayerStat.of(index, tensors))
        return stats

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The epoch-start snapshots (each layer's tensors, flat), keyed by global layer index, for checkpoints."""
        return {str(index): snapshot for index, snapshot in self._snapshots.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore snapshots saved by :meth:`state_dict` (on any device)."""
        expected = sorted(str(index) for index in self._snapshots)
        if sorted(state) != expected:
            raise ValueError(
                f"the checkpoint holds weight snapshots of layers {sorted(state)}, this side has "
                f"layers {expected}: resume with the partition it was saved with"
            )
        for index, snapshot in self._snapshots.items():
            saved = state[str(index)]
            if saved.shape != snapshot.shape:
                raise ValueError(
                    f"the weight snapshot of layer {index} has shape {tuple(saved.shape)}, "
                    f"expected {tuple(snapshot.shape)}: resume with the model it was saved with"
                )
            self._snapshots[index] = saved.to(device=snapshot.device, dtype=torch.float32).clone()
