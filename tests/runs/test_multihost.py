"""Several processes on JAX's distributed runtime: two processes on this machine (localhost coordinator, gloo
collectives, one CPU device each) train as one process with two devices does, step for step; a SIGTERM to one
of them, then to the other 3 s later (a preemption reaching the hosts seconds apart), stops both at the same step
and both exit 0; the restarted pair resumes to the losses of the uninterrupted run (a resume
with another number of processes is refused: test_reliability.py). Both tests compare with one single-process
run on two devices (the `single` fixture): the first checks that two processes reproduce it, so the second uses it
as its uninterrupted run."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_path
from retfiner_jax.data import synthetic
from retfiner_jax.runs.run_log import read_metrics

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
import configs
from retfiner_jax.config_defaults import tiny_model


def get_config():
  c = tiny_model(configs.load("retfound"))
  c.model.dtype = "float32"
  c.tokenizer = {vocab!r}
  c.data.train_manifest = {train!r}
  c.data.val_manifest = {val!r}
  c.train.update(batch_size=8, log_every=1, epochs=2)  # 48 pairs: 6 steps an epoch, 12 in all.
  return c
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(config, workdir, *extra):
  return [sys.executable, "-m", "retfiner_jax.main", f"--config={config}", f"--workdir={workdir}", *extra]


def _env(devices: int):
  # The suite's XLA flags (conftest.py) without any device count, then this test's.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  if devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=" ".join(flags))


def _pair(config, workdir, logs, sigterm_after_step=None, then_process_0_after=None):
  """Starts processes 0 and 1 together; optionally SIGTERMs process 1 once process 0 printed that step, and
  process 0 too, `then_process_0_after` seconds later (a preemption reaching the hosts seconds apart)."""
  port = _free_port()
  procs = []
  for i in (0, 1):
    out = open(logs / f"p{i}.log", "w")
    procs.append(subprocess.Popen(
        _command(config, workdir, "--distributed", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}"), cwd=ROOT, env=_env(1), stdout=out, stderr=subprocess.STDOUT, text=True))
  deadline = time.time() + 400
  signalled = False
  while any(p.poll() is None for p in procs) and time.time() < deadline:
    time.sleep(0.5)
    if sigterm_after_step and not signalled and f"step {sigterm_after_step:6d}/" in (logs / "p0.log").read_text():
      procs[1].send_signal(signal.SIGTERM)
      signalled = time.time()
    if then_process_0_after is not None and signalled and time.time() - signalled >= then_process_0_after:
      procs[0].send_signal(signal.SIGTERM)
      then_process_0_after = None
  for p in procs:
    if p.poll() is None:
      p.kill()
  return [p.wait() for p in procs], [(logs / f"p{i}.log").read_text() for i in (0, 1)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  """(config file, metrics of its run by one process with two devices)."""
  folder = tmp_path_factory.mktemp("multihost")
  synthetic.generate(folder / "corpus", count=48, seed=0, height=64, width=64, workers=1, log=lambda *a: None)
  config = folder / "tiny.py"
  config.write_text(CONFIG.format(vocab=str(shared_path("reference", "vocab.txt")),
                                  train=str(folder / "corpus" / "manifest.csv"),
                                  val=str(folder / "corpus" / "manifest_val.csv")))
  one = subprocess.run(_command(config, folder / "one"), cwd=ROOT, env=_env(2), capture_output=True, text=True,
                       timeout=400)
  assert one.returncode == 0, one.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 1} on 2 cpu device(s), 1 process(es)" in one.stdout
  return config, read_metrics(folder / "one" / "metrics.jsonl")


def test_two_processes_train_as_one_process_with_two_devices_and_resume_after_a_sigterm(single, tmp_path):
  config, single = single
  logs = tmp_path / "logs"
  logs.mkdir()
  codes, (out0, out1) = _pair(config, tmp_path / "two", logs, sigterm_after_step=3, then_process_0_after=3)
  assert codes == [0, 0], (out0[-3000:], out1[-3000:])
  assert "mesh {'data': 2, 'fsdp': 1} on 2 cpu device(s), 2 process(es)" in out0
  saved0 = [line for line in out0.splitlines() if "saved a checkpoint at step" in line]
  saved1 = [line for line in out1.splitlines() if "saved a checkpoint at step" in line]
  # Process 0 stopped for process 1's signal, or for its own if that came first on a slow machine; either way one
  # step, saved by both (the rerun below resumes from it) ...
  assert len(saved0) == 1 and saved0[0].startswith(("another process was signalled", "SIGTERM"))
  assert not saved1  # ... and process 1 prints nothing: one progress stream, from process 0.
  stopped = int(saved0[0].split("step ")[1].split(";")[0])
  assert 4 <= stopped < 12

  codes, (out0, out1) = _pair(config, tmp_path / "two", logs)
  assert codes == [0, 0], (out0[-3000:], out1[-3000:])
  assert f"resumed from {tmp_path / 'two' / 'checkpoints'} at step {stopped}" in out0

  pair = read_metrics(tmp_path / "two" / "metrics.jsonl")
  assert [(r["kind"], r["step"]) for r in pair] == [(r["kind"], r["step"]) for r in single]
  assert [r["step"] for r in pair if r["kind"] == "train"] == list(range(1, 13))
  for a, b in zip(single, pair):
    for key in ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_gm"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=f"{a['kind']} step {a['step']} {key}")
    if a["kind"] == "val":
      assert b["recall_i2t_at_1"] == a["recall_i2t_at_1"] and b["examples"] == a["examples"]
  assert (tmp_path / "two" / "export" / "retfiner_flax" / "model.json").exists()


def test_a_lost_host_stops_the_survivor_within_30_s_with_one_line_and_both_resume_to_the_same_losses(single,
                                                                                                    tmp_path):
  """Issue 37: SIGKILL of process 1 mid-run. Process 0 exits within 30 s with status 1 (no core dump, no
  shutdown-barrier wait), its stderr is a few lines whose last names the lost process, the step, the last
  complete checkpoint and the command to resume; both processes rerun with that command resume from that
  checkpoint and end with the losses of an uninterrupted run (`single`: two processes train as it does, the test
  above; how often a run saves does not change its losses)."""
  single_config, single = single
  config = tmp_path / "tiny.py"
  config.write_text(single_config.read_text().replace("epochs=2)", "epochs=2)\n  c.checkpoint.every_steps = 2"))
  logs = tmp_path / "logs"
  logs.mkdir()

  port, procs = _free_port(), []
  for i in (0, 1):
    procs.append(subprocess.Popen(
        _command(config, tmp_path / "lost", "--distributed", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}"), cwd=ROOT, env=_env(1), stdout=open(logs / f"l{i}.out", "w"),
        stderr=open(logs / f"l{i}.err", "w"), text=True))
  deadline, killed_at, exited_at = time.time() + 400, None, None
  while time.time() < deadline:
    time.sleep(0.2)
    if procs[0].poll() is not None:
      exited_at = time.time()
      break
    if killed_at is None and "step      7/" in (logs / "l0.out").read_text():
      procs[1].send_signal(signal.SIGKILL)
      killed_at = time.time()
    if killed_at is not None and time.time() - killed_at > 60:
      break
  survivor = procs[0].poll()
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  assert killed_at is not None, (logs / "l0.out").read_text()[-2000:]
  err = (logs / "l0.err").read_text().strip().splitlines()
  assert survivor == 1, (survivor, err[-20:])
  assert exited_at is not None and exited_at - killed_at < 30, (exited_at, killed_at)
  last = err[-1]
  assert len(err) <= 20, err
  assert "lost" in last and "last complete checkpoint is" in last and "rerun on every host the command it ran: python -m retfiner_jax.main" in last
  assert "Check failure" not in "\n".join(err) and "core dumped" not in "\n".join(err)
  checkpoint = int(last.split("last complete checkpoint is ")[1].split(".")[0].rsplit("/", 1)[1])
  assert 2 <= checkpoint < 12  # Saved every 2 steps; the kill comes after step 7 was printed.

  codes, (out0, _) = _pair(config, tmp_path / "lost", logs)
  assert codes == [0, 0]
  assert f"resumed from {tmp_path / 'lost' / 'checkpoints'} at step {checkpoint}" in out0
  whole = {r["step"]: r for r in single if r["kind"] == "train"}
  resumed = {r["step"]: r for r in read_metrics(tmp_path / "lost" / "metrics.jsonl") if r["kind"] == "train"}
  assert sorted(resumed) == list(range(1, 13))
  for step in range(1, 13):  # The tolerance of two processes against one (the test above).
    np.testing.assert_allclose(resumed[step]["loss"], whole[step]["loss"], rtol=1e-4, err_msg=f"step {step}")
