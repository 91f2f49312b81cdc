"""Start edgepipe-cloud and edgepipe-edge as processes, the way a user does."""
from __future__ import annotations

import os
import signal
import site
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "CLOUD_READY_PREFIX",
    "LaunchError",
    "cloud_command",
    "edge_command",
    "node_env",
    "run_edge",
    "start_cloud",
    "stop",
    "tail",
]

#: The first line edgepipe-cloud prints on stdout once it serves, followed by ``HOST:PORT``.
CLOUD_READY_PREFIX = "edgepipe-cloud listening on "

#: The directory holding the pipeline, cloud_node and edge_node packages.
_ROOT = Path(__file__).resolve().parent.parent


class LaunchError(RuntimeError):
    """A node did not start or ran past its time limit; the message holds the tail of its log."""


def cloud_command(
    config_path: str | Path, *, listen: str = "127.0.0.1:0", threads: int = 1, extra: Sequence[str] = ()
) -> list[str]:
    """The command line of a cloud server on ``config_path`` (port 0 in ``listen``: a free port);
    ``extra`` is appended as is."""
    return [sys.executable, "-m", "edgepipe.cloud_cli", "--config", str(config_path), "--listen", listen,
            "--threads", str(threads), *extra]


def edge_command(
    config_path: str | Path,
    *,
    cloud: str | None,
    run_dir: str | Path,
    threads: int = 1,
    max_steps: int | None = None,
    epochs: int | None = None,
    name: str | None = None,
    progress: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of an edge worker training ``config_path`` into ``run_dir``.

    ``cloud`` is the ``HOST:PORT`` a cloud server printed, or None for ``--local`` (one process,
    no network: the reference run). ``max_steps`` and ``epochs`` override the configuration,
    ``name`` is the name the edge reports to the cloud, ``progress=False`` turns the progress
    bar off, and ``extra`` is appended as is.
    """
    where = ["--local"] if cloud is None else ["--cloud", cloud]
    cmd = [sys.executable, "-m", "edgepipe.edge_cli", "--config", str(config_path), *where, "--run-dir", str(run_dir),
           "--threads", str(threads)]
    if name is not None:
        cmd += ["--name", name]
    if not progress:
        cmd.append("--no-progress")
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    return [*cmd, *extra]


def tail(path: str | Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file, or ``(no log)`` when it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:])


def stop(process: subprocess.Popen[Any], timeout: float = 15.0) -> int:
    """SIGTERM, wait up to ``timeout`` seconds, SIGKILL if still running; return the exit code.

    Never leaves the process running; closes its stdout pipe if it has one.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout:
        process.stdout.close()
    return process.returncode


def start_cloud(
    config_path: str | Path,
    *,
    threads: int = 1,
    stderr: str | Path | None = None,
    timeout: float = 120.0,
    cwd: str | Path | None = None,
    extra: Sequence[str] = (),
    code_dir: str | Path | None = None,
) -> tuple[subprocess.Popen[str], str]:
    """Start a cloud server on a free loopback port; return it and the ``HOST:PORT`` it printed.

    ``extra`` is appended to its command line (see :func:`cloud_command`); ``code_dir`` runs
    another checkout's code (see :func:`node_env`). Its stderr goes to
    the file ``stderr`` (created or truncated), or to this process's stderr when None. A server
    that has not printed its address within ``timeout`` seconds is killed. Raises
    :class:`LaunchError` (with the tail of the log) when the server does not start; the caller
    stops a started server with :func:`stop`.
    """
    cmd = cloud_command(config_path, threads=threads, extra=extra)
    if stderr is None:
        cloud = _popen(cmd, stdout=subprocess.PIPE, stderr=None, cwd=cwd, code_dir=code_dir)
    else:
        with Path(stderr).open("w", encoding="utf-8") as err:
            cloud = _popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=cwd, code_dir=code_dir)
    # The first line names the address; a timer kills a server that never gets there.
    timer = threading.Timer(timeout, cloud.kill)
    timer.start()
    try:
        line = cloud.stdout.readline() if cloud.stdout else ""
    except BaseException:
        stop(cloud)
        raise
    finally:
        timer.cancel()
    if not line.startswith(CLOUD_READY_PREFIX):
        code = stop(cloud)
        where = "; see its message above" if stderr is None else f":\n{tail(stderr)}"
        raise LaunchError(f"the cloud server did not start (exit code {code}){where}")
    return cloud, line.removeprefix(CLOUD_READY_PREFIX).strip()


def run_edge(
    command: Sequence[str],
    *,
    log: str | Path | None = None,
    timeout: float | None = None,
    cwd: str | Path | None = None,
    code_dir: str | Path | None = None,
) -> int:
    """Run an edge worker (see :func:`edge_command`) to completion; return its exit code.

    Its stdout and stderr go to the file ``log`` (created or truncated), or to this process's
    when None; ``code_dir`` runs another checkout's code (see :func:`node_env`). Past ``timeout`` seconds it is stopped and :class:`LaunchError` raised with the
    tail of the log; on any other exception (Ctrl-C included) it is stopped too.
    """
    if log is None:
        edge = _popen(command, stdout=None, stderr=None, cwd=cwd, code_dir=code_dir)
    else:
        with Path(log).open("w", encoding="utf-8") as out:
            edge = _popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, code_dir=code_dir)
    try:
        return edge.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(edge)
        where = "" if log is None else f":\n{tail(log)}"
        raise LaunchError(f"the edge worker ran past {timeout:.0f} s{where}") from None
    except BaseException:
        stop(edge)
        raise


def _popen(cmd: Sequence[str], *, stdout: int | IO[str] | None, stderr: int | IO[str] | None,
           cwd: str | Path | None, code_dir: str | Path | None) -> subprocess.Popen[str]:
    return subprocess.Popen(list(cmd), stdout=stdout, stderr=stderr, text=True, cwd=cwd, env=node_env(code_dir))


def node_env(code_dir: str | Path | None = None) -> dict[str, str]:
    """This environment, with the packages' directory (``code_dir``, or this code's) first on
    PYTHONPATH unless it is a site directory: a node then runs that code from any directory."""
    env = os.environ.copy()
    root = os.path.realpath(_ROOT if code_dir is None else code_dir)
    site_dirs = {os.path.realpath(d) for d in (*site.getsitepackages(), site.getusersitepackages())}
    if root not in site_dirs:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env
