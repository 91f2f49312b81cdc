"""User model factories for the "package.module:factory" form of build_model (used by test_models)."""

from collections import OrderedDict

from torch import nn


def small(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Sequential:
    """A two-layer model; it takes no ``width``, so build_model must not pass one."""
    channels = input_shape[0]
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(
                nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
            ),
            fc=nn.Linear(4, num_classes),
        )
    )


def not_sequential(**kwargs: object) -> nn.Module:
    """Wrong on purpose: returns a bare module instead of an nn.Sequential."""
    return nn.Linear(4, 2)


def needs_depth(depth: int) -> nn.Sequential:
    """Wrong on purpose: requires an argument edgepipe does not offer."""
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(depth)])
