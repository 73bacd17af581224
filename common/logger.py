"""Run folders: config.json, TensorBoard scalars, evaluations.jsonl, a progress bar.

`{log_dir}/{algorithm}__{env}__{seed}__{time}/` holds everything one run writes; benchmarks/
reads only these files. TensorBoard event files are written by tensorboardX, which needs
neither TensorFlow nor PyTorch.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from tensorboardX import SummaryWriter
from tqdm import tqdm

CONFIG_FILE = "config.json"
EVALUATIONS_FILE = "evaluations.jsonl"
CHECKPOINT_FILE = os.path.join("checkpoints", "latest.msgpack")


def new_run_dir(log_dir: str, algorithm: str, env: str, seed: int) -> str:
    """A fresh run folder name; `/` in env ids becomes `-`."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(log_dir, f"{algorithm}__{env.replace('/', '-')}__{seed}__{stamp}")


def write_json(path: str, value: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    temporary = path + ".tmp"
    with open(temporary, "w") as file:
        json.dump(value, file, indent=2, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def read_evaluations(run_dir: str) -> list[dict]:
    """The evaluations a run has written, in order (torn last lines are skipped)."""
    path = os.path.join(run_dir, EVALUATIONS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as file:
        for line in file:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def format_table(config: Mapping[str, Any]) -> str:
    """The hyperparameters as a two-column text table."""
    width = max(len(key) for key in config)
    lines = [f"{'hyperparameter':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{key:<{width}}  {value}" for key, value in config.items()]
    return "\n".join(lines)


class RunLogger:
    """Writes one run's folder. `resume_step` continues an existing run after its checkpoint."""

    def __init__(self, run_dir: str, config: Mapping[str, Any], total_steps: int,
                 resume_step: int | None = None, elapsed: float = 0.0, progress: bool = True):
        self.run_dir = run_dir
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        if resume_step is None:
            write_json(os.path.join(run_dir, CONFIG_FILE), dict(config))
            print(format_table(config))
        else:
            self._drop_evaluations_after(resume_step)
        self.writer = SummaryWriter(run_dir, purge_step=resume_step)
        self.start = time.time() - elapsed
        self.last_eval = ""
        self.bar = tqdm(total=total_steps, initial=resume_step or 0, disable=not progress,
                        dynamic_ncols=True, smoothing=0.05, unit="step")

    def elapsed(self) -> float:
        return time.time() - self.start

    def _drop_evaluations_after(self, step: int) -> None:
        kept = [record for record in read_evaluations(self.run_dir) if record["step"] <= step]
        path = os.path.join(self.run_dir, EVALUATIONS_FILE)
        with open(path + ".tmp", "w") as file:
            file.writelines(json.dumps(record) + "\n" for record in kept)
        os.replace(path + ".tmp", path)

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, float(value), step)

    def evaluation(self, step: int, phase: str, metrics: Mapping[str, float]) -> None:
        record = {"step": step, "phase": phase, **metrics, "wall_time": round(self.elapsed(), 2)}
        with open(os.path.join(self.run_dir, EVALUATIONS_FILE), "a") as file:
            file.write(json.dumps(record) + "\n")
        self.scalars({f"eval/{name}": value for name, value in metrics.items()}, step)
        self.writer.flush()
        shown = metrics.get("normalized_score", metrics["return"])
        self.last_eval = f"{'score' if 'normalized_score' in metrics else 'return'} {shown:.1f}"
        self.bar.set_postfix_str(f"{phase} eval {self.last_eval}", refresh=False)
        self.bar.write(f"[{phase} step {step}] " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
