"""The AOT tool (python -m retfiner_jax.aot): the tiny model's real train step compiled for TPU and GPU targets
this machine does not have, its memory report, --fit, and a saved step that `main` runs without compiling.

The compiled-memory figures are XLA's own for each target; the checks here are that the report is XLA's
(arguments equal the state and batch each device holds, counted by hand from the shardings), that a step made
too large for a device is reported as not fitting while --fit finds a setting that fits, and that a saved step
gives the same losses as compiling."""
import dataclasses
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import aot_environment, require_compilers, shared_path, tiny_config
from retfiner_jax.errors import ConfigError
from retfiner_jax.refine import aot, inputs, trainer
from retfiner_jax.runs import sharding, targets
from retfiner_jax.runs.run_log import read_metrics

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"target", "devices", "fits", "gib_per_device", "compile_s", "tflop_per_step", "settings"}
TINY_CONFIG = '''
import configs
from retfiner_jax.config_defaults import tiny_model


def get_config():
  c = tiny_model(configs.load("retfound"))
  c.model.dtype = "float32"
  c.train.batch_size = 8
  {extra}
  return c
'''


def write_config(folder: Path, extra: str = "") -> Path:
  path = folder / "tiny_config.py"
  path.write_text(TINY_CONFIG.replace("{extra}", extra))
  return path


def write_vit_l_attention_config(folder: Path, batch_size: int, image_size: int = 224) -> Path:
  """The tiny config at ViT-L/16's attention shapes (224 px: 197 tokens; 16 heads), a small width, in bfloat16:
  what the fused-attention checks compile (`image_size` 64: 17 tokens, a quicker compile)."""
  return write_config(folder, extra="\n  ".join((
      f"c.model.image_size = {image_size}",
      "c.model.vision_dim, c.model.vision_heads, c.model.vision_depth, c.model.vision_mlp_dim = 256, 16, 2, 512",
      "c.model.dtype = 'bfloat16'", f"c.train.batch_size = {batch_size}")))


def run_aot(*args):
  """The command, with the compilers of requirements-aot.txt on its path; its JSON lines."""
  env = aot_environment(JAX_DEFAULT_MATMUL_PRECISION="highest")  # This process's matmul precision (conftest).
  out = subprocess.run([sys.executable, "-m", "retfiner_jax.aot", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
  reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  return out, reports


def test_targets_parse_and_name_their_mistakes():
  assert targets.parse_target("v5e:2x4", None).devices == 8
  assert targets.parse_target("v4:2x2x1", None).devices == 4
  t = targets.parse_target(None, "2x8xh100")
  assert (t.devices, t.topology, t.gpu_key) == (16, "2x8", "h100")
  assert targets.parse_target(None, "h200").devices == 1
  # JAX's GPU client takes 75 % of the memory unless told otherwise: what a run can use.
  assert targets.parse_target(None, "h100").capacity_bytes == int(84942979072 * 0.75)
  assert targets.parse_target(None, "h100", memory_gib=2.0).capacity_bytes == 2 * 1024 ** 3
  for topology, target in (("v9z:2x2", None), ("v5e", None), (None, "a100"), ("v5e:2x2", "h100"), (None, None)):
    with pytest.raises(ConfigError):
      targets.parse_target(topology, target)
  # XLA's out-of-memory messages -> (needed, available).
  tpu = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 18.38G of 15.75G hbm. Exceeded hbm capacity by 2.63G."
  assert targets.out_of_memory_figures(tpu) == (int(18.38 * 2 ** 30), int(15.75 * 2 ** 30))
  tpu = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (37.29G) "
         "exceeds available HBM (15.75G).")  # libtpu 0.0.42's wording, seen compiling for v5e.
  assert targets.out_of_memory_figures(tpu) == (int(37.29 * 2 ** 30), int(15.75 * 2 ** 30))
  gpu = "Can't reduce memory use below 60.30GiB (64749427735 bytes) by rematerialization; only reduced to 82.62GiB"
  assert targets.out_of_memory_figures(gpu) == (int(82.62 * 2 ** 30), int(60.30 * 2 ** 30))


def test_the_cuda_compilers_are_found_in_cuda_12s_or_cuda_13s_layout(tmp_path, monkeypatch):
  """requirements-aot.txt's CUDA 12 wheels, or the CUDA 13 wheels a GPU machine's jax[cuda13] brings (plugin
  jax_plugins/xla_cuda13, ptxas under nvidia/cu13/bin): either set is enough, half of one is not."""
  def layout(name, files):
    root = tmp_path / name
    for f in files:
      (root / f).parent.mkdir(parents=True, exist_ok=True)
      (root / f).write_text("")
    return root
  cuda13 = ["jax_plugins/xla_cuda13/__init__.py", "nvidia/cu13/bin/ptxas"]
  cuda12 = ["jax_plugins/xla_cuda12/__init__.py", "nvidia/cuda_nvcc/__init__.py", "nvidia/cuda_nvcc/bin/ptxas"]
  cases = [("cuda13", cuda13, True), ("cuda12", cuda12, True), ("cuda13_without_ptxas", cuda13[:1], False),
           ("ptxas_without_plugin", cuda13[1:], False)]
  for name, files, complete in cases:
    with monkeypatch.context() as m:
      m.setattr(sys, "path", [str(layout(name, files))] + [p for p in sys.path if ".aot-compilers" not in p])
      for module in [k for k in sys.modules if k.split(".")[0] in ("jax_plugins", "nvidia")]:
        m.delitem(sys.modules, module)
      missing = targets.missing_compiler("cuda")
      assert (missing is None) == complete, (name, missing)
      if not complete:
        assert "pip install --no-deps --target=.aot-compilers -r requirements-aot.txt" in missing


def test_tpu_v5e_data_by_fsdp_mesh_compiles_and_reports_its_memory(tmp_path):
  """The command on a v5e:2x2 slice, mesh data 2 x fsdp 2: fits, exit 0, the JSON line's keys; the arguments XLA
  counts are the parameters, optimizer state and batch that one device holds under the FSDP layout."""
  require_compilers("tpu")
  out, reports = run_aot(f"--config={write_config(tmp_path)}", "--topology=v5e:2x2", "--config.mesh.data=2",
                         "--config.mesh.fsdp=2")
  assert out.returncode == 0, out.stderr[-3000:]
  (r,) = reports
  assert KEYS <= set(r) and r["fits"] is True and r["devices"] == 4 and r["device_kind"].startswith("TPU v5")
  # remat 'auto' resolved for the TPU: each layer recomputed from what it keeps.
  assert r["settings"] == {"batch_size": 8, "remat": "elementwise", "mesh": {"data": 2, "fsdp": 2},
                           "micro_batches": 1, "dtype": "float32"}
  g, split = r["gib_per_device"], r["memory_split_gib"]
  assert g["capacity"] == 15.75 and 0 < g["temporaries"] and g["arguments"] <= g["total"] <= g["capacity"]
  by_hand = split["parameters"] + split["optimizer_state"] + split["batch"]
  assert g["arguments"] == pytest.approx(by_hand, abs=2e-3)
  assert "FITS" in out.stderr and "where the memory goes" in out.stderr


def test_megacore_tpu_compiles_with_one_device_per_chip(tmp_path):
  """v4 (megacore: one device per chip, as the hardware shows itself): the tiny step compiles and fits, and FSDP
  over the 4 chips leaves each device about a quarter of the parameters."""
  require_compilers("tpu")
  config = write_config(tmp_path)
  out, (replicated,) = run_aot(f"--config={config}", "--topology=v4:2x2x1")
  assert out.returncode == 0 and replicated["devices"] == 4 and replicated["device_kind"] == "TPU v4", out.stderr
  out, (split,) = run_aot(f"--config={config}", "--topology=v4:2x2x1", "--config.mesh.data=1",
                          "--config.mesh.fsdp=4")
  assert out.returncode == 0 and split["fits"] and split["settings"]["mesh"] == {"data": 1, "fsdp": 4}
  ratio = split["memory_split_gib"]["parameters"] / replicated["memory_split_gib"]["parameters"]
  assert 0.25 <= ratio < 0.4  # Small leaves (< 1024 elements, or indivisible) stay whole.


def test_two_h100s_with_our_description_compile_as_with_xlas_own(tmp_path):
  """Two H100s on one host: the tiny step fits, and our H100 description, written from the chip's figures, gives
  the same compiled memory as the target file XLA ships for it (../shared/accelerators, from openxla/xla)."""
  require_compilers("cuda")
  xla_file = shared_path("accelerators", "gpu-target-configs", "h100_sxm.txtpb")
  config = write_config(tmp_path)
  out, (ours,) = run_aot(f"--config={config}", "--target=2xh100")
  assert out.returncode == 0 and ours["device_kind"] == "NVIDIA H100 80GB HBM3" and ours["devices"] == 2, out.stderr
  out, (theirs,) = run_aot(f"--config={config}", "--target=2xh100", f"--gpu_target_config={xla_file}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert ours["fits"] and ours["gib_per_device"]["capacity"] == pytest.approx(84942979072 * 0.75 / 2 ** 30,
                                                                              abs=1e-3)
  assert ours["gib_per_device"] == theirs["gib_per_device"]


def test_the_h200_step_runs_fused_attention_and_keeps_no_float32_or_elementwise_residuals(tmp_path):
  """The shipped settings on an H200 (config.model.attention and remat 'auto': cuDNN's fused attention, the ViT's
  blocks recomputed whole from what they name) against the step before them (attention 'xla', remat 'none'), both
  compiled by XLA for the H200 at ViT-L/16's attention shapes (197 tokens, 16 heads) and a small width. What the
  scanned ViT blocks keep for the backward pass is read from the loop state of XLA's optimised program (the H200
  dump of the full step showed the float32 probabilities at 7.6 GB, and six float32 and four 4096-wide buffers per
  block): now per block its input and the residual stream between its halves, the qkv projection, fc1's output and
  cuDNN's output and statistics, nothing else (vit.BLOCK_KEEPS); q, k, v padded for cuDNN, LayerNorm outputs and
  the GELU are recomputed."""
  require_compilers("cuda")
  config = write_vit_l_attention_config(tmp_path, batch_size=2)
  scores = re.compile(r"f32\[(?:\d+,)*16,19[78],19[78]\]")
  runs = {}
  for name, settings in (("shipped", ("auto", "auto")), ("before", ("xla", "none"))):
    hlo = tmp_path / f"{name}.hlo"
    out, (report,) = run_aot(f"--config={config}", "--target=h200", f"--hlo={hlo}",
                             f"--config.model.attention={settings[0]}", f"--config.model.remat={settings[1]}")
    assert out.returncode == 0, out.stderr[-3000:]
    program = hlo.read_text()
    # The ViT's scan: the loop whose state holds per-block (depth 2, batch 2, 197 tokens) stacks.
    vit_loop = next(line for line in program.splitlines() if " while(" in line and ",2,197,256]" in line)
    kept = lambda dtype, width: vit_loop.count(f"{dtype}[2,2,197,{width}]")
    runs[name] = dict(report=report, program=program, f32_width=kept("f32", 256), mlp=kept("bf16", 512),
                      width=kept("bf16", 256), qkv=kept("bf16", 768), padded=vit_loop.count("bf16[2,2,198,16,16]"))
  shipped, before = runs["shipped"], runs["before"]
  assert shipped["report"]["attention"] == "fused" and shipped["report"]["settings"]["remat"] == "elementwise"
  assert shipped["report"]["fused_attention_calls"] == 2  # Forward and backward; the forward is not recomputed.
  assert 'custom_call_target="__cudnn$fmhaSoftmaxBackward"' in shipped["program"]
  assert not scores.findall(shipped["program"])
  assert shipped["f32_width"] == 0 and shipped["mlp"] == 1 and shipped["qkv"] == 1
  assert shipped["width"] == 2 and shipped["padded"] == 1  # Input and mid-block stream; cuDNN's output.
  assert before["report"]["attention"] == "xla" and before["report"]["fused_attention_calls"] == 0
  assert "f32[2,2,16,197,197]" in scores.findall(before["program"])  # Stacked over the scanned blocks.
  assert before["f32_width"] >= 4 and before["mlp"] >= 4
  assert shipped["report"]["gib_per_device"]["temporaries"] < before["report"]["gib_per_device"]["temporaries"]


def test_the_fused_attention_compiles_for_eight_gpus(tmp_path):
  """The shipped settings' cuDNN attention on an 8-GPU data-parallel mesh. Without the operands laid out as the
  batch (models/attention.py), XLA handed the kernel's partitioner a layout it could not express on the (8, 1)
  mesh and the compile failed, although one GPU and two compiled."""
  require_compilers("cuda")
  config = write_vit_l_attention_config(tmp_path, batch_size=16)
  out, reports = run_aot(f"--config={config}", "--target=8xh100")
  assert out.returncode == 0 and len(reports) == 1, out.stderr[-3000:]
  assert reports[0]["settings"]["mesh"] == {"data": 8, "fsdp": 1}
  assert reports[0]["attention"] == "fused" and reports[0]["fused_attention_calls"] >= 2, reports[0]


def test_an_eight_chip_tpu_slice_runs_the_vit_on_its_own_images(tmp_path):
  """Batch 32 on a v5e-8 (data 8): each chip's ViT computes its own 4 images. Left to XLA's sharding propagation,
  the ViT ran on images split only 2 ways (16 a chip, four chips' work and memory; the shipped RETFound at batch
  128 needed 31.3 GiB a chip instead of about 13.6); the layers' inputs are now laid out as the batch is
  (models/layout.py). The ViT's attention scores are the only (.., 16 heads, 17, 17) arrays of this program."""
  require_compilers("tpu")
  config = write_vit_l_attention_config(tmp_path, batch_size=32, image_size=64)
  out, reports = run_aot(f"--config={config}", "--topology=v5e:2x4", f"--hlo={tmp_path / 'step.hlo'}")
  assert out.returncode == 0 and reports[0]["settings"]["mesh"] == {"data": 8, "fsdp": 1}, out.stderr[-3000:]
  program = (tmp_path / "step.hlo").read_text()
  score_rows = {int(rows) for rows in re.findall(r"f32\[(?:[0-9]+,)?([0-9]+),16,17,17\]", program)}
  assert score_rows == {32 // 8}, score_rows


def test_too_large_is_reported_and_fit_finds_a_setting(tmp_path):
  """Batch 64 on two H100s given 0.08 GiB each: the step as configured needs about 0.1 GiB and does not fit;
  --fit tries remat dots first, which needs about 0.06 GiB: it fits, exit 0, and the JSON names what was tried."""
  require_compilers("cuda")
  cfg = write_config(tmp_path, "c.train.batch_size = 64\n  c.model.vocab_size = 512\n  c.model.image_size = 64")
  out, reports = run_aot(f"--config={cfg}", "--target=2xh100", "--memory_gib=0.08", "--fit")
  assert out.returncode == 0, out.stderr[-3000:]
  (r,) = reports
  assert [t["rung"] for t in r["tried"]] == ["as configured", "remat dots"]
  assert [t["fits"] for t in r["tried"]] == [False, True]
  assert r["tried"][0]["total_gib"] > 0.08 >= r["gib_per_device"]["total"]
  assert r["fits"] and r["settings"]["remat"] == "dots" and r["gib_per_device"]["capacity"] == 0.08
  assert "DOES NOT FIT" in out.stderr and "first setting that fits: remat dots" in out.stderr


def test_usage_errors_exit_2(tmp_path):
  out, _ = run_aot(f"--config={write_config(tmp_path)}", "--topology=v5e:2x2", "--target=h100")
  assert out.returncode == 2 and "exactly one of --topology" in out.stderr
  out, _ = run_aot(f"--config={write_config(tmp_path)}", "--topology=v9:2")
  assert out.returncode == 2 and "--topology=v9:2" in out.stderr
  # Compilers installed for another jaxlib: one line naming both versions, before JAX loads them.
  (tmp_path / "other" / "jax_cuda12_plugin-0.0.1.dist-info").mkdir(parents=True)
  out, _ = run_aot(f"--config={write_config(tmp_path)}", "--target=h100", f"--compilers={tmp_path / 'other'}")
  jaxlib = importlib.metadata.version("jaxlib")
  assert out.returncode == 2 and f"holds the compilers for jaxlib 0.0.1, but this Python has jaxlib {jaxlib}" in \
      out.stderr, out.stderr[-2000:]
  (tmp_path / "cuda13" / "jax_cuda13_plugin-0.0.2.dist-info").mkdir(parents=True)  # A GPU machine's CUDA 13 set.
  out, _ = run_aot(f"--config={write_config(tmp_path)}", "--target=h100", f"--compilers={tmp_path / 'cuda13'}")
  assert out.returncode == 2 and f"holds the compilers for jaxlib 0.0.2, but this Python has jaxlib {jaxlib}" in \
      out.stderr, out.stderr[-2000:]
  # This machine's own CPU needs no compilers: the mismatched folder is left alone.
  out, _ = run_aot(f"--config={write_config(tmp_path)}", "--target=cpu", f"--compilers={tmp_path / 'cuda13'}")
  assert "holds the compilers" not in out.stderr and out.returncode in (0, 1), out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------
# Compile once, run many (CPU).

def run_config(corpus, **train):
  return tiny_config(corpus, max_steps=2, **train)


def test_the_batch_the_step_is_compiled_for_is_the_pipelines(corpus):
  config = run_config(corpus)
  cfg = trainer.model_config(config)
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  train_iter, *_ = inputs.setup_data(config, cfg, mesh, log=lambda *a: None)
  batch = next(train_iter)
  train_iter.close()
  from retfiner_jax.data.pipeline import train_batch_shapes
  shapes = train_batch_shapes(8, cfg.image_size, cfg.max_text_length)
  assert {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()} == \
      {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in shapes.items()}


def test_a_saved_cpu_step_runs_in_main_with_the_same_losses_and_another_is_refused(corpus, tmp_path):
  saved = tmp_path / "step.bin"
  out, (report,) = run_aot(f"--config={write_config(tmp_path)}", "--target=cpu", f"--save={saved}")
  assert out.returncode == 0 and report["saved"] == str(saved) and saved.stat().st_size > 0, out.stderr[-3000:]
  lines = []
  compiled = trainer.run(run_config(corpus), tmp_path / "compiled", log=lambda *a: None)
  loaded_config = run_config(corpus)
  loaded_config.compiled_step = str(saved)
  loaded = trainer.run(loaded_config, tmp_path / "loaded", log=lambda line, **_: lines.append(str(line)))
  assert compiled["status"] == loaded["status"] == "finished"
  assert any(f"loaded the compiled train step from {saved}" in line for line in lines)
  assert not any("compiling the train step" in line for line in lines)

  def losses(workdir):
    return [r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if r["kind"] == "train"]
  assert losses(tmp_path / "loaded") == losses(tmp_path / "compiled") and len(losses(tmp_path / "loaded")) == 2
  other = run_config(corpus, batch_size=16)
  other.compiled_step = str(saved)
  with pytest.raises(ConfigError, match="compiled for another step .*the program"):
    trainer.run(other, tmp_path / "other", log=lambda *a: None)
  not_a_step = tmp_path / "junk.bin"
  not_a_step.write_bytes(b"\x00junk")
  other = run_config(corpus)
  other.compiled_step = str(not_a_step)
  with pytest.raises(ConfigError, match="not a compiled step"):
    trainer.run(other, tmp_path / "junk", log=lambda *a: None)


def test_a_step_that_does_not_fit_exits_1_and_is_not_saved(tmp_path):
  saved = tmp_path / "step.bin"
  out, (report,) = run_aot(f"--config={write_config(tmp_path)}", "--target=cpu", "--memory_gib=0.0001",
                           f"--save={saved}")
  assert out.returncode == 1 and report["fits"] is False and not saved.exists()
  assert "DOES NOT FIT" in out.stderr and "not saved" in out.stderr


def test_running_out_of_memory_while_compiling_is_one_message_with_the_figures_and_the_fit_command(
    monkeypatch, corpus, tmp_path):
  """An out-of-memory error while compiling (libtpu's wording) stops the run with XLA's figures, not a traceback;
  `main` adds the aot --fit command built from its own --config flags (aot.fit_command)."""
  class FakeLowered:
    def compile(self, compiler_options=None):  # As jax.stages.Lowered.compile.
      raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                         "temporaries (18.38G) exceeds available HBM (15.75G).")

  real = trainer.compile_step

  def fake(config, built, log=print):  # The real compile_step, given a step whose lowering gives FakeLowered.
    return real(config, dataclasses.replace(built, step_fn=type("F", (), {"lower": lambda self, *a: FakeLowered()})()),
                log)
  monkeypatch.setattr(trainer, "compile_step", fake)
  with pytest.raises(aot.DeviceMemoryExceeded) as e:
    trainer.run(run_config(corpus), tmp_path / "oom", lambda *a, **k: None)
  assert "needs 18.38 GiB per device for its temporaries, 15.75 GiB available" in str(e.value)
  cpu = jax.devices("cpu")
  assert aot.fit_command(["--config=retfound", "--workdir=w", "--config.train.batch_size=8"], cpu) == \
      "python -m retfiner_jax.aot --config=retfound --config.train.batch_size=8 --target=<the accelerator> --fit"
  h100 = [type("D", (), {"device_kind": "NVIDIA H100 80GB HBM3", "platform": "gpu"})()] * 8
  assert aot.fit_command(["--config=urfound"], h100).endswith("--config=urfound --target=8xh100 --fit")


def readme_aot_lines() -> list[str]:
  """The README's `python -m retfiner_jax.aot` command lines (its "compile for it here" block), verbatim."""
  lines = [line.split("  #")[0].strip() for line in (ROOT / "README.md").read_text().splitlines()
           if line.startswith("python -m retfiner_jax.aot ")]
  assert len(lines) >= 4, lines
  return lines


def test_the_readmes_aot_lines_work_as_written_with_nothing_set(tmp_path):
  """Issue 36: after the README's install line, each aot line of the README runs exactly as written, with neither
  PYTHONPATH nor JAX_PLATFORMS set (the tool finds .aot-compilers beside the checkout and sets the platform before
  JAX is imported). Full-size compiles take minutes each, so each line runs until its compile-only devices are
  made and the compile starts ("compiling the train step for ..."), where the CUDA plugin's driver check used to
  fail; then it is stopped. Without the compilers (--compilers pointing at an empty folder), the error names the
  install line. The lines run from the checkout, as the Quickstart does."""
  import shlex
  import signal
  import time
  require_compilers("tpu")
  require_compilers("cuda")
  env = {k: v for k, v in aot_environment().items() if k not in ("PYTHONPATH", "JAX_PLATFORMS")}
  for line in readme_aot_lines():
    args = shlex.split(line)
    proc = subprocess.Popen([sys.executable] + args[1:], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    seen, deadline = [], time.time() + 240
    try:
      for err in proc.stderr:
        seen.append(err)
        if "compiling the train step for" in err or time.time() > deadline:
          break
    finally:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
    assert any("compiling the train step for" in e for e in seen), (line, "".join(seen[-15:]))
    assert not any("Unable to load CUDA" in e or "no compile-only devices" in e for e in seen), line
  empty = tmp_path / "no-compilers"
  empty.mkdir()
  out = subprocess.run([sys.executable, "-m", "retfiner_jax.aot", "--config=retfound", "--target=h200",
                        f"--compilers={empty}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert out.returncode != 0 and "pip install --no-deps --target=.aot-compilers -r requirements-aot.txt" in out.stderr
