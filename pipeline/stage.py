"""Run one slice of layers on micro-batches: forward, backward, frozen prefix without autograd."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Stage"]


class Stage:
    """A contiguous slice ``layers`` of the whole model, starting at global index ``offset``.

    ``boundary`` is the freeze boundary of the whole model: the slice's layers below it run
    under ``torch.no_grad()`` and keep no activations.  Forward passes are keyed by micro-batch
    index so that backward passes may arrive later and in any order: each micro-batch's
    parameter gradients are kept apart and :meth:`accumulate_gradients` sums them in
    torchgpipe's order (the last micro-batch first), so the result is the same to the last bit
    whatever order the backward passes ran in. The price is one gradient copy per micro-batch.

    ``first_parameter`` is the index in the whole model's ``parameters()`` of the slice's first
    tensor (0 at offset 0; None when unknown): skip decisions name tensors by that index.
    """

    def __init__(self, layers: nn.Sequential, offset: int, first_parameter: int | None = None) -> None:
        self.layers = layers
        self.offset = offset
        self.first_parameter = 0 if offset == 0 else first_parameter
        self.boundary = 0
        self._saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._gradients: dict[int, list[torch.Tensor | None]] = {}
        self._buffers: dict[str, torch.Tensor] | None = None

    @property
    def frozen(self) -> int:
        """How many of this slice's layers are frozen."""
        return min(max(self.boundary - self.offset, 0), len(self.layers))

    @property
    def trains(self) -> bool:
        """Whether any layer of this slice still learns."""
        return self.frozen < len(self.layers)

    def forward(self, key: int, x: torch.Tensor, *, input_grad: bool = False) -> torch.Tensor:
        """Training forward of one micro-batch; keeps what :meth:`backward` needs under ``key``.

        ``input_grad`` asks for the gradient with respect to ``x`` (the cloud does, for the
        edge head); it is only available while the whole slice trains.
        """
        frozen = self.frozen
        with torch.no_grad():
            for layer in self.layers[:frozen]:
                x = layer(x)
        if frozen == len(self.layers):
            return x
        leaf = x.detach().requires_grad_(input_grad and frozen == 0)
        out = self.layers[frozen:](leaf)
        self._saved[key] = (leaf, out)
        return out

    def backward(
        self, key: int, grad: torch.Tensor | None = None, *, loss: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Backward of the micro-batch ``key``, from the gradient of its output or from a scalar
        ``loss`` computed on that output.

        Returns the gradient with respect to the input when :meth:`forward` asked for it.
        """
        leaf, out = self._saved.pop(key)
        if loss is not None:
            loss.backward()
        elif out.requires_grad:
            torch.autograd.backward(out, grad)
        params = self._trainable()
        self._gradients[key] = [p.grad for p in params]
        for p in params:
            p.grad = None
        return leaf.grad if leaf.requires_grad else None

    def accumulate_gradients(self) -> None:
        """Sum the kept micro-batch gradients into ``.grad``, last micro-batch first (GPipe's order)."""
        params = self._trainable()
        for key in sorted(self._gradients, reverse=True):
            for p, g in zip(params, self._gradients[key], strict=True):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad += g  # what autograd's accumulation does, in the same order
        self._gradients.clear()

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.layers.parameters() if p.requires_grad]

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Forward-only pass in eval mode; every layer's train/eval mode is restored afterwards."""
        modes = [(module, module.training) for module in self.layers.modules()]
        self.layers.eval()
        try:
            with torch.no_grad():
                return self.layers(x)
        finally:
            for module, training in modes:
                module.training = training

    def begin_step(self) -> None:
        """Start a step: remember the buffers (BatchNorm running statistics) to undo an abort."""
        self._saved.clear()
        self._gradients.clear()
        self._buffers = {name: buf.clone() for name, buf in self.layers.named_buffers()}

    def abort_step(self) -> None:
        """Undo the buffer updates of an unfinished step and drop its saved activations and gradients."""
        self._saved.clear()
        self._gradients.clear()
        if self._buffers is not None:
            with torch.no_grad():
                for name, buf in self.layers.named_buffers():
                    buf.copy_(self._buffers[name])
        self._buffers = None
