"""What edge and cloud compare before a session starts: the fingerprint and what differs."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn

from pipeline.config import Config

__all__ = ["architecture", "describe_differences", "fingerprint"]


def architecture(model: nn.Sequential) -> list[list[Any]]:
    """Every state-dict entry's name, shape and type: catches two builds of different code."""
    return [[name, list(t.shape), str(t.dtype)] for name, t in model.state_dict().items()]


def fingerprint(config: Config, model: nn.Sequential) -> str:
    """A hash of the agreed configuration and the architecture it builds."""
    blob = json.dumps([config.agreed(), architecture(model)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
        return flat
    return {prefix: data}


def describe_differences(edge: dict[str, Any], cloud: dict[str, Any], limit: int = 8) -> str:
    """Name the keys whose values differ, e.g. ``partition.edge_head: edge 3, cloud 2``."""
    ours, theirs = _flatten(edge), _flatten(cloud)
    keys = sorted(set(ours) | set(theirs))
    diffs = [f"{k}: edge {ours.get(k, '<unset>')!r}, cloud {theirs.get(k, '<unset>')!r}" for k in keys if ours.get(k) != theirs.get(k)]
    if not diffs:
        return "the configurations agree but the model architectures differ (different code for the same model name?)"
    more = f" (and {len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more
