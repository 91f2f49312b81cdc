"""Per-layer weight statistics of one side, with the epoch-start snapshots the update norms need."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from pipeline.skip.decisions import LayerStat

__all__ = ["LayerStatistics"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: The modules whose ``.weight`` makes up a layer's "weights" in the statistics.
_WEIGHTED = (*_CONVS, nn.Linear)


def _weighted_modules(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules() if isinstance(m, _WEIGHTED)]


def _flat_weights(modules: Sequence[nn.Module]) -> torch.Tensor:
    # torch.cat always copies, so the result is safe to keep as a snapshot.
    return torch.cat([m.weight.detach().reshape(-1).float() for m in modules])


class LayerStatistics:
    """Per-side collector: keeps a float32 snapshot of its layers' weights at each epoch start.

    Build it after the model is on its device and before the first step of an epoch.
    """

    def __init__(self, layers: nn.Sequential, offset: int) -> None:
        self._layers: list[tuple[int, bool, list[nn.Module]]] = []
        for position, layer in enumerate(layers):
            modules = _weighted_modules(layer)
            if modules:
                has_conv = any(isinstance(m, _CONVS) for m in modules)
                self._layers.append((offset + position, has_conv, modules))
        self._snapshots = {index: _flat_weights(modules) for index, _, modules in self._layers}

    def collect(self, *, epoch_end: bool) -> list[LayerStat]:
        """Statistics of this side's layers with weights; at an epoch end also the epoch's update norm.

        At an epoch end the snapshot is retaken, so the next epoch's update starts here.
        """
        if not self._layers:
            return []
        rows = []
        for index, _, modules in self._layers:
            flat = _flat_weights(modules)
            # A single weight has no unbiased variance (NaN); report 0 instead.
            variance = torch.var(flat) if flat.numel() > 1 else flat.new_zeros(())
            row = [torch.linalg.vector_norm(flat), variance]
            if epoch_end:
                row.append(torch.linalg.vector_norm(flat - self._snapshots[index].to(flat.device)))
                self._snapshots[index] = flat
            rows.append(torch.stack(row))
        values = torch.stack(rows).tolist()  # one device sync for all layers
        return [
            LayerStat(index, has_conv, row[0], row[1], row[2] if epoch_end else None)
            for (index, has_conv, _), row in zip(self._layers, values)
        ]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The epoch-start snapshots, keyed by global layer index, for checkpoints."""
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
