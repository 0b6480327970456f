"""Writes experiments/muloco_vs_diloco.ipynb (nbformat v4): python experiments/make_notebook.py"""

import os

import nbformat
from nbformat import v4

HERE = os.path.dirname(os.path.abspath(__file__))

CELLS = [
  (
    "md",
    """# MuLoCo vs DiLoCo on a CPU (muloco_jax)

MuLoCo = DiLoCo with **Muon** as the inner optimizer (arXiv 2505.23725). This notebook trains a tiny
Llama-style model on the embedded King James Bible (byte-level) with K workers that sync every H
steps, once with AdamW inner steps (DiLoCo) and once with Muon inner steps (MuLoCo), and plots the
train and eval losses. It runs on a CPU in a few minutes (no accelerator needed).

**In Colab:** first run, in a cell,
`!git clone <URL of your muloco_jax repository> muloco_jax && %cd muloco_jax`
(or upload the repository), then run the cells below. The install cell does nothing when
`muloco_jax` already imports (e.g. in the project's virtual environment).""",
  ),
  (
    "code",
    """# Install the package only if it is not importable yet (no network needed otherwise).
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("muloco_jax") is None:
    repo = next((p for p in (".", "..", "muloco_jax")
                 if os.path.exists(os.path.join(p, "setup.py"))), None)
    if repo is None:
        raise RuntimeError("Clone the muloco_jax repository first (see the cell above).")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", repo])
    # Or, from a package index: %pip install muloco_jax
import muloco_jax
print("muloco_jax from", os.path.dirname(muloco_jax.__file__))""",
  ),
  (
    "md",
    """## Settings
Small enough for a CPU. `MULOCO_NB_STEPS` (an environment variable) shortens the run, e.g. for
automated tests. Same global batch, steps and sync period H for both methods.""",
  ),
  (
    "code",
    """import os, tempfile
from muloco_jax.config import default_config

STEPS = int(os.environ.get("MULOCO_NB_STEPS", "120"))
K = 2          # DiLoCo workers
H = max(STEPS // 6, 1)   # inner steps per round (the paper uses 30)

def make_config(inner):
    c = default_config()
    c.model.size = "tiny"; c.model.dtype = "float32"           # float32 on CPU
    c.data.name = "kjv"; c.data.tokenizer = "byte"; c.data.seq_len = 64
    c.train.num_steps = STEPS; c.train.batch_size = 16
    c.train.log_every = max(STEPS // 20, 1); c.train.eval_every = max(STEPS // 4, 1)
    c.train.eval_steps = 4; c.train.checkpoint_every = STEPS; c.train.progress_bar = False
    c.optimizer.name = inner
    c.optimizer.warmup_steps = max(STEPS // 10, 1)
    c.optimizer.ns_dtype = "float32"
    if inner == "muon":
        c.optimizer.learning_rate = 0.04; c.optimizer.adam_learning_rate = 3e-3
    else:
        c.optimizer.learning_rate = 6e-3
    c.diloco.num_workers = K; c.diloco.sync_every = H
    c.diloco.outer_lr = 0.7; c.diloco.outer_momentum = 0.9
    return c

print(f"K={K} workers, H={H}, {STEPS} steps")""",
  ),
  ("md", "## Train both (a minute or a few on a laptop CPU)"),
  (
    "code",
    """from muloco_jax import train, metrics

workroot = tempfile.mkdtemp(prefix="muloco_nb_")
runs = {}
for name, inner in (("DiLoCo (AdamW inner)", "adamw"), ("MuLoCo (Muon inner)", "muon")):
    workdir = os.path.join(workroot, inner)
    final = train.train_and_evaluate(make_config(inner), workdir)
    runs[name] = metrics.read_metrics(workdir)
    print(f"{name}: final eval loss {final['eval_loss']:.4f}")""",
  ),
  ("md", "## Loss curves"),
  (
    "code",
    """%matplotlib inline
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 4))
for i, (name, records) in enumerate(runs.items()):
    tr = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    ax.plot(*zip(*tr), color=f"C{i}", alpha=0.5, label=f"{name} train")
    ax.plot(*zip(*ev), color=f"C{i}", marker="o", linestyle="--", label=f"{name} eval")
ax.set_xlabel("step"); ax.set_ylabel("loss (nats/byte)"); ax.set_title(f"K={K}, H={H}")
ax.grid(alpha=0.3); ax.legend()
plt.show()

finals = {name: [r["eval_loss"] for r in recs if "eval_loss" in r][-1] for name, recs in runs.items()}
finals""",
  ),
  (
    "md",
    """With the default 120 steps MuLoCo usually ends lower than DiLoCo at the same K; the
full small-scale sweeps (K = 1..16, compression, directional correctness) are in
`experiments/` (see `experiments/README.md`).""",
  ),
]


def build() -> nbformat.NotebookNode:
  nb = v4.new_notebook()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  nb.cells = [
    v4.new_markdown_cell(src) if kind == "md" else v4.new_code_cell(src) for kind, src in CELLS
  ]
  return nb


if __name__ == "__main__":
  nb = build()
  nbformat.validate(nb)
  path = os.path.join(HERE, "muloco_vs_diloco.ipynb")
  nbformat.write(nb, path)
  print("wrote", path)
