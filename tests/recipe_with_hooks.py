"""``recipes/train_icl.py`` with two testing switches, as callbacks (they do not belong in the production loop).

    python tests/recipe_with_hooks.py [--stop-after-steps N] [--log-labels] RECIPE_ARGS...
    accelerate launch ... tests/recipe_with_hooks.py ...

``--stop-after-steps N``: send ourselves SIGTERM after optimizer step N, the same path as a cluster's preemption
signal (the recipe checkpoints and exits). ``--log-labels``: write each rank's trained labels per epoch to
``RUN/labels_rank<r>.jsonl`` (``{"epoch": e, "labels": [...]}``), for the exactly-once and resume tests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import train_icl  # noqa: E402


class StopAfterSteps:
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, run) -> None:
        if run.position["step"] == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class LogLabels:
    def __init__(self):
        self.labels: list[int] = []
        self.file = None

    def on_batch(self, run, batch, weight: float) -> None:
        if weight > 0:  # weight-0 stand-ins are replays, not training data
            self.labels += batch[1].tolist()

    def on_epoch_end(self, run, epoch: int) -> None:
        if self.file is None:
            path = run.run_dir / f"labels_rank{run.accelerator.process_index}.jsonl"
            self.file = open(path, "a" if run.resumed else "w")  # noqa: SIM115
        self.file.write(json.dumps({"epoch": epoch, "labels": self.labels}) + "\n")
        self.file.flush()
        self.labels = []


def main(argv: list[str] | None = None) -> int:
    hooks = argparse.ArgumentParser(add_help=False)
    hooks.add_argument("--stop-after-steps", type=int, default=None)
    hooks.add_argument("--log-labels", action="store_true")
    known, rest = hooks.parse_known_args(argv)
    callbacks: list = []
    if known.stop_after_steps is not None:
        callbacks.append(StopAfterSteps(known.stop_after_steps))
    if known.log_labels:
        callbacks.append(LogLabels())
    return train_icl.main(rest, callbacks=callbacks)


if __name__ == "__main__":
    sys.exit(main())
