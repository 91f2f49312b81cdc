"""``edgepipe token new NAME``: a fresh edge token and the entry that lets it into the cloud's edges file."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["add_token_command"]


def add_token_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``token new NAME [--out FILE]`` to the ``edgepipe`` subcommands."""
    token = subparsers.add_parser("token", help="make edge tokens for the cloud's edges file")
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    new = actions.add_parser(
        "new",
        help="print a fresh token and its edges-file entry",
        description="Make a fresh random edge token (256 bits) and print it together with the [[edge]] entry "
        "to add to the cloud's --edges file. The entry holds the token's SHA-256, not the token: the cloud "
        "never stores the secret. Give the token to the edge as --token-file FILE or $EDGEPIPE_TOKEN, "
        "and restart the cloud after editing its edges file.",
    )
    new.add_argument("name", metavar="NAME", help="the edge's name in the edges file and the cloud's logs")
    new.add_argument("--out", type=Path, metavar="FILE",
                     help="write the token to FILE (created with mode 0600; never overwritten) instead of printing it")
    new.set_defaults(run=_token_new)


def _token_new(args: argparse.Namespace) -> int:
    from pipeline.trust import TrustError, edges_line, new_token

    token = new_token()
    try:
        entry = edges_line(args.name, token)
        if args.out is not None:
            _write_secret(args.out, token)
    except (TrustError, OSError) as exc:
        print(f"edgepipe token: {_reason(exc)}", file=sys.stderr)
        return 2
    if args.out is None:
        print(f"token for {args.name} (a secret: give it to the edge as --token-file FILE or $EDGEPIPE_TOKEN):")
        print(token)
    else:
        print(f"wrote the token for {args.name} to {args.out} (mode 0600); give it to the edge as --token-file")
    print("\nadd this to the cloud's edges file (--edges) and restart the cloud:\n")
    print(entry, end="")
    return 0


def _write_secret(path: Path, token: str) -> None:
    """Create ``path`` readable by its owner only; an existing file is left alone (it may be a token in use)."""
    # O_EXCL: never truncate someone's token, nor inherit the looser mode of a file already there.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")


def _reason(exc: Exception) -> str:
    if isinstance(exc, FileExistsError):
        return f"{exc.filename} already exists; remove it or choose another --out"
    if isinstance(exc, OSError):
        return f"cannot write {exc.filename}: {exc.strerror}"
    return str(exc)
