"""The embedded default run: a cloud server and an edge worker on loopback, trained on digits."""
from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

from pipeline.config import ConfigError, parse_config
from edgepipe.launch import edge_command, run_edge, start_cloud, stop

__all__ = ["DEMO_CONFIG", "run_demo"]

#: MobileNetV2 at a quarter width on the digits upscaled to 32x32: stem and first block on the
#: edge, the classifier too (labels never leave the edge), four micro-batches per step, int8
#: activations up the link, and the edge head frozen by LARS layer skipping once it has converged.
DEMO_CONFIG = """\
# edgepipe demo configuration: written by `edgepipe demo`, usable as a starting point.
[model]
name = "mobilenetv2"
num_classes = 10
input_shape = [1, 32, 32]
width = 0.25
seed = 0

[partition]
edge_head = 2
edge_tail = 1
chunks = 4

[link]
uplink = "int8"
downlink = "fp32"
gradients = "fp32"

[skip]
# LARS layer skipping: after each epoch, freeze up to the deepest conv layer whose weight norm is
# more than alpha times its epoch update; capped at the edge head, whose freeze stops all
# gradient traffic down the link.
policy = "lars"
alpha = 2.0
max_boundary = 2

[train]
dataset = "digits"
batch_size = 32
epochs = 6
lr = 0.05
lr_schedule = "cosine"
"""

def run_demo(run_dir: Path, epochs: int | None = None) -> int:
    """Train the demo split across two local processes; print accuracy and the traffic table."""
    from rich.console import Console

    from edgepipe.tables import render_report
    from pipeline.runs import load_run

    config = parse_config(tomllib.loads(DEMO_CONFIG), "demo config")
    if epochs is not None and epochs < 1:
        raise ConfigError("--epochs must be at least 1")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.toml"
    config_path.write_text(DEMO_CONFIG, encoding="utf-8")
    console = Console(highlight=False, width=max(160, Console().width))
    console.print(
        f"edgepipe demo: {config.model.name} (width {config.model.width}) on digits, "
        f"{config.partition.edge_head} head + {config.partition.edge_tail} tail layers on the edge, "
        f"{config.partition.chunks} micro-batches; run directory {run_dir}"
    )
    # The demo owns its directory: each run starts afresh, the cloud keeping its checkpoints inside.
    state_dir = run_dir / "cloud-state"
    shutil.rmtree(state_dir, ignore_errors=True)
    cloud, address = start_cloud(config_path, extra=["--state-dir", str(state_dir)])
    console.print(f"cloud server up at {address}; training (progress on stderr)...")
    try:
        command = edge_command(config_path, cloud=address, run_dir=run_dir, name="demo-edge", epochs=epochs,
                               extra=["--overwrite"])
        code = run_edge(command)
    finally:
        stop(cloud)
    if code != 0:
        console.print(f"[red]edgepipe demo: the edge worker failed (exit code {code})[/red]")
        return code
    run = load_run(run_dir)
    for renderable in render_report(run):
        console.print(renderable)
    head = config.partition.edge_head
    frozen = [e for e in run.freeze_events() if e.boundary >= head]
    if frozen:
        console.print(
            f"the edge head (layers 0-{head - 1}) froze at step {frozen[0].step} of {len(run.steps)}: "
            "from then on no gradient crossed the downlink and the edge ran its head forward-only"
        )
    summary = run.summary
    accuracy = float("nan") if summary is None or summary.final_val_accuracy is None else summary.final_val_accuracy
    console.print(f"final validation accuracy: {accuracy:.4f}   (model: {run_dir / 'model.pt'})")
    return 0
