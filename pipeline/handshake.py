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
    """A hash of the agreed configuration and the architecture it builds.

    The devices are not in it (:meth:`Config.agreed` leaves them out): edge and cloud compute
    where each has the hardware, and the architecture is that of the untrained model's state.
    """
    blob = json.dumps([config.agreed(), architecture(model)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: Deeper than any configuration nests: below it a value is compared whole, so that hostile
#: JSON cannot make the comparison recurse without bound.
_MAX_DEPTH = 8
#: How much of one key or value a difference shows; the edge's side is the edge's own text.
_SHOWN_CHARS = 40
_UNSET = object()


def _flatten(data: Any, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    if isinstance(data, dict) and depth < _MAX_DEPTH:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key), depth + 1))
        return flat
    return {prefix: data}


def _key(key: str) -> str:
    if len(key) <= _SHOWN_CHARS and key.isprintable():
        return key
    return repr(key[:_SHOWN_CHARS]) + "..."


def _value(value: Any) -> str:
    if value is _UNSET:
        return "<unset>"
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def describe_differences(edge: dict[str, Any], cloud: dict[str, Any], limit: int = 8) -> str:
    """Name the keys whose values differ, e.g. ``partition.edge_head: edge 3, cloud 2``.

    At most ``limit`` keys are named, and each key and value is cut to a few dozen characters:
    the edge's side comes from the network.
    """
    ours, theirs = _flatten(edge), _flatten(cloud)
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k, _UNSET) != theirs.get(k, _UNSET))
    if not differing:
        return "the configurations agree but the model architectures differ (different code for the same model name?)"
    diffs = [
        f"{_key(k)}: edge {_value(ours.get(k, _UNSET))}, cloud {_value(theirs.get(k, _UNSET))}"
        for k in differing[:limit]
    ]
    more = f" (and {len(differing) - limit} more)" if len(differing) > limit else ""
    return "; ".join(diffs) + more
