"""What a run tells a person: progress lines, metrics.jsonl, TensorBoard event files, and the final plots."""
from __future__ import annotations

import json
import time
from pathlib import Path


class RunLog:
  """`start_step`: the step the run starts (or resumes) from; metrics.jsonl rows of later steps, written by a
  run that was killed before its next checkpoint, are dropped so that the resumed run does not repeat them."""

  def __init__(self, workdir, total_steps: int, batch_size: int, print_fn=print, start_step: int = 0,
               primary: bool = True, chance: dict | None = None):
    self.workdir = Path(workdir)
    self.chance = chance or {}  # {metric: its value when nothing is learnt}, printed beside the metric.
    self.metrics_path = self.workdir / "metrics.jsonl"
    self.primary = primary  # Several processes: only the first one writes and prints.
    self.total_steps, self.batch_size, self.print = total_steps, batch_size, print_fn
    self._tb, self._last_time, self._last_step = None, time.time(), None
    if not primary:
      return
    if self.metrics_path.exists():
      kept = [line for line in self.metrics_path.read_text().splitlines() if _step_of(line) <= start_step]
      self.metrics_path.write_text("".join(line + "\n" for line in kept))
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
    except ImportError:
      print_fn("tensorboardX not installed: no TensorBoard event files (metrics.jsonl is still written)")

  def write(self, kind: str, step: int, metrics: dict, **extra):
    if not self.primary:
      return
    record = {"kind": kind, "step": int(step), **extra, **{k: float(v) for k, v in metrics.items()}}
    with self.metrics_path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{kind}/{k}", float(v), int(step))
      self._tb.flush()

  def progress(self, epoch: int, step: int, metrics: dict):
    if not self.primary:
      return
    now = time.time()
    rate = ""
    if self._last_step is not None and step > self._last_step:
      seconds_per_step = (now - self._last_time) / (step - self._last_step)
      eta = seconds_per_step * max(self.total_steps - step, 0)
      rate = f"  {self.batch_size / seconds_per_step:7.1f} samples/s  ETA {_duration(eta)}"
    self._last_time, self._last_step = now, step
    losses = losses_line(metrics, chance=self.chance)
    if "lr" in metrics:
      losses += f"  lr {float(metrics['lr']):.2e}"
    wait = f"  input wait {100 * metrics['input_wait_fraction']:.0f}%" if "input_wait_fraction" in metrics else ""
    self.print(f"epoch {epoch:3d}  step {step:6d}/{self.total_steps}  {losses}{rate}{wait}")

  def close(self):
    if self._tb is not None:
      self._tb.close()


def losses_line(metrics: dict, keys=("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_gm"),
                chance: dict | None = None) -> str:
  """`name value (chance c)` for each of `keys` in `metrics`, with the chance value where `chance` has one."""
  chance = chance or {}
  return "  ".join(f"{k.removeprefix('loss_')} {float(metrics[k]):.4f}"
                   + (f" (chance {chance[k]:.4f})" if chance.get(k) is not None else "")
                   for k in keys if k in metrics)


def _step_of(line: str) -> float:
  """The step of a metrics.jsonl row; infinity for a line cut off by a kill (so it is dropped)."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return float("inf")


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def read_metrics(path) -> list[dict]:
  path = Path(path)
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_run(workdir):
  """Loss curves (train and validation) and validation retrieval recall -> workdir/training_curves.png."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  records = read_metrics(Path(workdir) / "metrics.jsonl")
  train = [r for r in records if r["kind"] == "train"]
  val = [r for r in records if r["kind"] == "val"]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for key in ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_gm"):
    if train and key in train[0]:
      axes[0].plot([r["step"] for r in train], [r[key] for r in train], label=key)
    if val and key in val[0]:
      axes[1].plot([r["step"] for r in val], [r[key] for r in val], marker="o", label=key)
  for key in sorted({k for r in val for k in r if k.startswith("recall")}):
    axes[2].plot([r["step"] for r in val], [r[key] for r in val], marker="o", label=key)
  for ax, title in zip(axes, ("training losses", "validation losses", "validation retrieval")):
    ax.set_title(title)
    ax.set_xlabel("step")
    if ax.lines:
      ax.legend(fontsize=8)
  fig.tight_layout()
  out = Path(workdir) / "training_curves.png"
  fig.savefig(out, dpi=90)
  plt.close(fig)
  return out
