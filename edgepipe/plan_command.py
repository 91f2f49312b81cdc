"""``edgepipe partition profile`` and ``edgepipe partition plan``: measure devices, then rank partitions."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from edgepipe.arguments import positive
from edgepipe.tables import format_bytes
from pipeline.config import Config, ConfigError, load_config
from pipeline.models import ModelError, build_configured
from pipeline.partition import PartitionError
from pipeline.planner import RESOURCES, Candidate, LinkSpec, PlanError, plan, predict
from pipeline.profiler import DeviceProfile, ProfileError, profile_layers

__all__ = ["add_partition_commands"]

#: Everything bad input can raise below; each message is one line naming the file, flag or key.
_INPUT_ERRORS = (ConfigError, ModelError, PartitionError, ProfileError, PlanError, OSError)


def add_partition_commands(partition_subparsers: argparse._SubParsersAction) -> None:
    """Register ``profile`` and ``plan`` on the subparsers of ``edgepipe partition``."""
    measure = partition_subparsers.add_parser(
        "profile",
        help="time every layer of a configuration's model on this machine",
        description="Time each layer's forward and backward pass (median of --repeats after a warm-up) at "
        "train.batch_size and a micro-batch 16 times smaller, print them and write a device profile (JSON) "
        "for 'edgepipe partition plan'. Run it on the edge device and on the cloud server.",
    )
    measure.add_argument("--config", required=True, help="configuration file (TOML)")
    measure.add_argument("--device", default="cpu", help="torch device to time on: cpu or cuda[:N] (default cpu)")
    measure.add_argument("--threads", type=positive(int), default=None,
                         help="torch threads (default: torch's choice; use what the node will run with)")
    measure.add_argument("--repeats", type=positive(int), default=5, help="timed runs per layer and size (default 5)")
    measure.add_argument("--out", required=True, metavar="P.json", help="where to write the profile")
    measure.set_defaults(run=_profile)

    rank = partition_subparsers.add_parser(
        "plan",
        help="rank cuts, chunk counts and codecs by predicted step time or link bytes",
        description="Predict, from an edge and a cloud device profile and the link's rates and round trip, the "
        "step time and bytes per step of every edge_head, edge_tail, chunks (1-16) and codec choice, by "
        "simulating the pipelined step, and print the best.",
    )
    rank.add_argument("--config", required=True, help="configuration file (TOML): model, batch and what stays fixed")
    rank.add_argument("--edge-profile", required=True, metavar="E.json", help="'partition profile' of the edge device")
    rank.add_argument("--cloud-profile", required=True, metavar="C.json", help="'partition profile' of the cloud")
    rank.add_argument("--up-mbps", type=positive(float), required=True, help="uplink (edge to cloud) rate, Mbit/s")
    rank.add_argument("--down-mbps", type=positive(float), required=True, help="downlink rate, Mbit/s")
    rank.add_argument("--rtt-ms", type=float, required=True, help="round-trip time, ms")
    rank.add_argument("--objective", choices=("time", "bytes"), default="time", help="what to minimise (default time)")
    rank.add_argument("--top", type=positive(int), default=10, help="candidates to print (default %(default)s)")
    rank.add_argument("--min-edge-head", type=int, default=0,
                      help="layers that must run first on the edge (1: raw inputs never leave it)")
    rank.add_argument("--min-edge-tail", type=int, default=0,
                      help="layers that must run last on the edge (1: labels never leave it)")
    rank.add_argument("--frozen-head", action="store_true",
                      help="predict the steps after the skip controller froze the edge head")
    rank.add_argument("--write", metavar="OUT.toml", help="write the configuration with the best candidate")
    rank.set_defaults(run=_plan)


def _fail(exc: Exception) -> int:
    print(f"edgepipe: {exc}", file=sys.stderr)
    return 2


def _console() -> Console:
    # The tables are wide: keep them whole when piped into a file or a CI log.
    return Console(highlight=False, width=max(160, Console().width))


def _profile(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        config = load_config(args.config)
        measured = profile_layers(
            build_configured(config.model),
            config.model.input_shape,
            config.train.batch_size,
            model_name=config.model.name,
            device=args.device,
            repeats=args.repeats,
        )
        measured.save(args.out)
    except _INPUT_ERRORS as exc:
        return _fail(exc)
    console = _console()
    console.print(_profile_table(measured))
    console.print(f"wrote {args.out}")
    return 0


def _profile_table(measured: DeviceProfile) -> Table:
    table = Table(
        title=f"{measured.model_name} on {measured.device}, {measured.torch_threads} torch threads",
        caption=f"median of {measured.repeats} after a warm-up; the planner fits a + b·n through these sizes",
    )
    for header in ("#", "name", "output/sample"):
        table.add_column(header, justify="left" if header == "name" else "right")
    for n in measured.batch_sizes:
        table.add_column(f"fwd ms\nn={n}", justify="right")
        table.add_column(f"bwd ms\nn={n}", justify="right")
    for layer in measured.layers:
        pairs = zip(layer.forward_seconds, layer.backward_seconds, strict=True)
        times = [f"{1000 * t:.3f}" for pair in pairs for t in pair]
        table.add_row(str(layer.index), layer.name, format_bytes(layer.output_bytes), *times)
    return table


def _plan(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        edge = DeviceProfile.load(args.edge_profile)
        cloud = DeviceProfile.load(args.cloud_profile)
        link = LinkSpec(args.up_mbps, args.down_mbps, args.rtt_ms)
        candidates = plan(
            config,
            edge,
            cloud,
            link,
            objective=args.objective,
            head_trains=not args.frozen_head,
            min_edge_head=args.min_edge_head,
            min_edge_tail=args.min_edge_tail,
        )
        configured = _configured(config, edge, cloud, link, head_trains=not args.frozen_head)
        if args.write:
            Path(args.write).write_text(candidates[0].to_config(config).to_toml(), encoding="utf-8")
    except _INPUT_ERRORS as exc:
        return _fail(exc)
    console = _console()
    console.print(_plan_table(candidates[: args.top], configured, len(candidates), args.objective, link))
    if args.write:
        console.print(f"wrote {args.write} (the best candidate in {args.config})")
    return 0


def _configured(
    config: Config, edge: DeviceProfile, cloud: DeviceProfile, link: LinkSpec, *, head_trains: bool
) -> Candidate | None:
    """The prediction for the configuration's own split, or None when that split does not fit its model."""
    try:
        return predict(config, edge, cloud, link, head_trains=head_trains)
    except PartitionError:  # the plan is what such a configuration needs: show it without a reference row
        return None


def _plan_table(
    shown: list[Candidate], configured: Candidate | None, total: int, objective: str, link: LinkSpec
) -> Table:
    table = Table(
        title=f"best {len(shown)} of {total} candidates by {'step time' if objective == 'time' else 'link bytes'}: "
        f"{link.up_mbps:g} Mbit/s up, {link.down_mbps:g} Mbit/s down, {link.rtt_ms:g} ms round trip",
        caption="predicted steady-state step (1F1B pipeline of edge, uplink, cloud, downlink, plus one round trip); "
        "busy ms: how long each resource works per step",
    )
    for header in ("rank", "head", "tail", "chunks", "uplink", "gradients", "step ms", "up/step", "down/step"):
        table.add_column(header, justify="right")
    for resource in RESOURCES:
        table.add_column(f"{resource}\nbusy ms", justify="right")
    table.add_column("bottleneck")
    for rank, candidate in enumerate(shown, 1):
        table.add_row(str(rank), *_cells(candidate))
    if configured is not None:
        table.add_section()
        table.add_row("config", *_cells(configured), style="cyan")
    return table


def _cells(c: Candidate) -> list[str]:
    busy = [f"{1000 * c.busy_seconds[r]:.2f}" for r in RESOURCES]
    return [
        str(c.edge_head),
        str(c.edge_tail),
        str(c.chunks),
        c.uplink,
        c.gradients,
        f"{1000 * c.step_seconds:.2f}",
        format_bytes(c.uplink_bytes),
        format_bytes(c.downlink_bytes),
        *busy,
        c.bottleneck,
    ]

