"""The main command: RetFiner refinement of a foundation model with paired reports.

  python -m retfiner_jax.main --config=configs/retfound.py --workdir=runs/retfound [--config.x=value ...]

The self-contained demo has its own command: python -m retfiner_jax.demo --workdir=runs/demo

Several hosts (--distributed): every host runs the same command. A preemption (SIGTERM or SIGINT to any process)
makes every process save the same step and exit 0; rerun the same command to resume. A lost host (a process
killed, a machine gone) stops every survivor: the next collective fails at once (or, where it would hang, the
runtime's heartbeat stops it after --heartbeat_timeout seconds); process 0 prints one line naming the lost
process where the runtime says which, the step, the last complete checkpoint and the command to resume, and
every process exits with status 1. --heartbeat_timeout and --shutdown_timeout tune the runtime's waits.
"""
import time

LAUNCHED = time.time()  # Before the imports: the start-up phases are timed from here.

import functools  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config: a name in configs/ (retfound, visionfm, "
                                          "urfound) or a path", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, exports; reused to resume")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "several processes (hosts): call "
                                  "jax.distributed.initialize() first; with no other flag it finds its peers on a "
                                  "TPU pod, under SLURM or Open MPI")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, for --distributed where nothing "
                                   "tells it (e.g. two hosts started by hand)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "how many processes take part (with --coordinator)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0 .. num_processes - 1")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 20, "--distributed: seconds without a heartbeat after which "
                                  "the runtime declares a process lost and stops the others (JAX's default is 100)")
_SHUTDOWN = flags.DEFINE_integer("shutdown_timeout", 30, "--distributed: seconds the processes wait for each other "
                                 "at the end of a run")
flags.mark_flags_as_required(["config", "workdir"])


def start_distributed(log):
  """jax.distributed.initialize with the given flags (or auto-detection); CPU collectives over gloo."""
  import jax
  given = {"coordinator_address": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
           "process_id": _PROCESS_ID.value}
  if any(v is not None for v in given.values()) and not _DISTRIBUTED.value:
    raise app.UsageError("--coordinator/--num_processes/--process_id need --distributed")
  if _DISTRIBUTED.value:
    # Gloo carries the collectives between CPU processes (a CPU-only cluster, or the two-process test); GPUs
    # and TPUs use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None},
                               heartbeat_timeout_seconds=_HEARTBEAT.value, shutdown_timeout_seconds=_SHUTDOWN.value)
    log(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local device(s), "
        f"{jax.device_count()} in all")
  return jax.process_index(), jax.process_count()


def run_with_fit_hint(config, workdir, log, **kwargs):
  """trainer.run; a step that does not fit in device memory names the command that finds settings that do."""
  import jax
  from retfiner_jax.refine import aot, trainer
  try:
    return trainer.run(config, workdir, log, **kwargs)
  except aot.DeviceMemoryExceeded as e:
    raise aot.DeviceMemoryExceeded(f"{e}. Settings that fit: {aot.fit_command(sys.argv[1:], jax.devices())}",
                                   e.needed, e.available) from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if "demo" in config:
    raise app.UsageError("this is the demo's config: run python -m retfiner_jax.demo --workdir=DIR")
  logging.set_verbosity(logging.WARNING)  # Orbax reports every save at INFO.
  say = functools.partial(print, flush=True)
  index, count = start_distributed(say)
  # Several processes: process 0 prints; any process's error names it.
  log = say if index == 0 else (lambda *a, **k: None)
  prefix = f"process {index}: " if count > 1 else ""
  from retfiner_jax.errors import run_reporting_user_errors
  from retfiner_jax.runs import compile_cache
  compile_cache.enable(config.compile_cache, log)
  # Model sizes set on the command line win over the weights' own (trainer.run takes the rest from the weights).
  explicit = [a.split("=")[0][len("--config.model."):] for a in sys.argv[1:] if a.startswith("--config.model.")]
  try:
    run_reporting_user_errors(run_with_fit_hint, config, _WORKDIR.value, log, explicit_model_keys=explicit,
                              launched=LAUNCHED, prefix=prefix)
    if count > 1:  # The run is saved and over: a preemption's late signal must not end the exit with an error.
      import signal
      for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
  except Exception as e:
    if count > 1:
      from retfiner_jax.runs.lost_peer import exit_on_lost_peer, is_lost_peer
      if is_lost_peer(e):  # One line, and out at once: no wait in the shutdown barrier for the dead peer.
        exit_on_lost_peer(index, count, getattr(e, "retfiner_step", None), _WORKDIR.value, sys.argv[1:], e)
    if prefix:
      print(f"{prefix}{type(e).__name__}: {e}", file=sys.stderr, flush=True)
    raise


def cli():
  """The console script's entry point."""
  from retfiner_jax import cli as command_line
  command_line.run(main)


if __name__ == "__main__":
  cli()
