"""Regenerate protos/edgepipe_pb2.py and protos/edgepipe_pb2_grpc.py from protos/edgepipe.proto.

Usage: python scripts/gen_protos.py [--out DIR]   (needs the dev extra: grpcio-tools)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(out: Path) -> None:
    """Run protoc on the proto file, writing the Python modules into ``out``."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    # Compiling with the repo root as include path makes the generated grpc module import
    # "protos.edgepipe_pb2", which is the installed package path.
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(ROOT / "protos" / "edgepipe.proto"),
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args()
    generate(args.out)
    print(f"wrote {args.out / 'protos'}/edgepipe_pb2.py and edgepipe_pb2_grpc.py", file=sys.stderr)


if __name__ == "__main__":
    main()
