"""A skip policy that writes the statistics it reads to a file, for ``edgepipe skip replay``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.skip.decisions import Decision, StepStats
from pipeline.skip.policies import SkipPolicy
from pipeline.skip.replay import stats_line

__all__ = ["StatsRecorder"]


class StatsRecorder(SkipPolicy):
    """``policy``, deciding as it does, with each step's statistics appended to ``path`` as a line.

    The file is the input of :func:`pipeline.skip.replay.read_stats`. A run that resumes drops
    the lines of the steps it trains again, so the file stays one line per step.
    """

    def __init__(self, policy: SkipPolicy, path: Path) -> None:
        super().__init__(policy.cap, policy.param_layers)
        self.policy = policy
        self.name = policy.name  # type: ignore[misc]  # checkpoints name the policy, not the recorder
        self.path = Path(path)
        self._started = False

    def initial(self) -> Decision:
        """The policy's decision for step 0."""
        return self.policy.initial()

    def decide(self, stats: StepStats) -> Decision:
        """Record ``stats``, then let the policy decide on them."""
        if not self._started:
            self._keep_before(stats.step)
            self._started = True
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(stats_line(stats, self.param_layers)) + "\n")
        return self.policy.decide(stats)

    def _keep_before(self, step: int) -> None:
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("", encoding="utf-8")
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", step) < step]
        self.path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def state_dict(self) -> dict[str, Any]:
        """The policy's state."""
        return self.policy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the policy's state."""
        self.policy.load_state_dict(state)
