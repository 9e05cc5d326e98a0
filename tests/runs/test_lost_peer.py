"""The lost-host line (runs/lost_peer.py) on constructed errors: what counts as a lost peer, the lost process
named where the runtime names it, the last complete checkpoint (a folder Orbax is still writing is not one)."""
from retfiner_jax.runs import lost_peer


class JaxRuntimeError(Exception):
  pass


def test_a_runtime_error_with_the_runtimes_words_is_a_lost_peer_and_a_bug_is_not():
  assert lost_peer.is_lost_peer(JaxRuntimeError("UNKNOWN: Gloo all-reduce failed: Connection reset by peer"))
  assert lost_peer.is_lost_peer(JaxRuntimeError("UNAVAILABLE: task /job:jax_worker/replica:0/task:1 heartbeat"))
  assert not lost_peer.is_lost_peer(ValueError("Connection reset by peer"))  # Not the runtime's.
  assert not lost_peer.is_lost_peer(JaxRuntimeError("INVALID_ARGUMENT: shapes do not match"))
  assert not lost_peer.is_lost_peer(KeyboardInterrupt())


def test_the_line_names_the_process_the_step_the_last_complete_checkpoint_and_the_command(tmp_path):
  for name in ("2", "4", "6.orbax-checkpoint-tmp-1733", "best"):
    (tmp_path / "checkpoints" / name).mkdir(parents=True)
  error = JaxRuntimeError("UNAVAILABLE: The following tasks are unhealthy: /job:jax_worker/replica:0/task:1\nmore")
  argv = ["--config=retfound", f"--workdir={tmp_path}", "--distributed", "--process_id=0"]
  line = lost_peer.lost_peer_line(0, 2, 7, tmp_path, argv, error)
  assert line.startswith("process 0 of 2: lost process 1 at step 7 (JaxRuntimeError: UNAVAILABLE")
  assert f"the last complete checkpoint is {tmp_path / 'checkpoints' / '4'}." in line and "\n" not in line
  assert line.endswith(f"python -m retfiner_jax.main --config=retfound --workdir={tmp_path} --distributed "
                       "--process_id=<the host's own>")
  other = lost_peer.lost_peer_line(1, 2, 7, tmp_path, argv, JaxRuntimeError("Connection reset by peer"))
  assert other == "process 1: lost contact with another process at step 7; stopping (process 0 says how to resume)"
  (tmp_path / "empty").mkdir()
  assert "no checkpoint was complete yet" in lost_peer.lost_peer_line(0, 2, None, tmp_path / "empty", argv, error)
