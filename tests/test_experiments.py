"""Smoke runs of the reproduction sweeps (experiments/) and headless execution of the notebook.

All slow but the grid of reproduce.py's overlap stage: `pytest -m slow tests/test_experiments.py`.  Each script runs in a subprocess with
--smoke into a temporary directory; the tests check the result files, tables and plots.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")


def _run_script(name, tmp_path, *args, timeout=1800):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, as the sweeps run
  env["JAX_PLATFORMS"] = "cpu"
  out, runs = tmp_path / "results", tmp_path / "runs"
  cmd = [
    sys.executable,
    os.path.join(EXPERIMENTS, name),
    "--smoke",
    f"--out={out}",
    f"--runs={runs}",
    *args,
  ]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return out, proc


def _check_outputs(sweep_dir, pngs):
  for f in ("results.json", "results.csv", "table.md", *pngs):
    path = sweep_dir / f
    assert path.exists(), path
    assert path.stat().st_size > 0, path
  for png in pngs:
    assert (sweep_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (sweep_dir / png).stat().st_size < 200_000
  return json.loads((sweep_dir / "results.json").read_text())


@pytest.mark.slow
def test_reproduce_smoke(tmp_path):
  """Every stage on a few 8-step cells, two processes sharing the cells; then a rerun trains
  nothing and the summary covers every finding."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out, runs = tmp_path / "results", tmp_path / "runs"
  cmd = [sys.executable, os.path.join(EXPERIMENTS, "reproduce.py"), "--smoke", "--poll=1"]
  cmd += [f"--out={out}", f"--runs={runs}"]
  procs = [
    subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for _ in range(2)
  ]
  logs = [p.communicate(timeout=3000)[0].decode() for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  trained = [line.split(" -> ")[0] for log in logs for line in log.splitlines() if " -> " in line]
  assert len(trained) == len(set(trained)) > 0  # no cell trained twice
  summary = json.loads((out / "summary.json").read_text())
  # Every finding on both seeds, but the overlap's alpha findings: pairs of (K, F, tau, seed).
  assert {f["n_seeds"] for f in summary if " beats alpha=" not in f["finding"]} <= {0, 2}
  texts = " ".join(f["finding"] for f in summary)
  claims = ("DP Muon", "MuLoCo beats DiLoCo at K=2", "statistical 2-bit", "Error feedback")
  overlap = "Streaming MuLoCo K=2, F=2, overlap tau=1 with keep_progress adoption"
  for claim in claims + ("Streaming MuLoCo with F=2", overlap, "alpha=0.5 beats", "Muon's K=2"):
    assert claim in texts, claim
  for f in ("summary.md", "results.md", "loss_vs_k.png", "compression.png", "directional.png"):
    assert (out / "reproduction" / f).stat().st_size > 0, f
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert " -> " not in again.stdout
  assert json.loads((out / "summary.json").read_text()) == summary


def _overlap_stage(plan):
  """reproduce.overlap with a stand-in for Cells: the cells it asks for, per call of run, and
  what it returns.  Synthetic losses make alpha 0.5 the best with replace, 0 with keep_progress."""
  from experiments import reproduce

  gap = {"replace": {0.0: 0.02, 0.5: 0.01}, "keep_progress": {0.0: 0.001, 0.5: 0.003}}

  class Cells:
    def __init__(self):
      self.plan, self.asked = plan, []

    def run(self, todo):
      self.asked.append(todo)
      return {
        name: dict(
          info,
          final_eval_loss=1.45
          * (1 + (gap[info["adoption"]][info["alpha"]] * info["tau"] if info["tau"] else 0)),
        )
        for name, (_, info) in todo.items()
      }

  chosen = {("muloco", k): dict(lr=0.04, outer=(0.7 + 0.3 * (k == 8), 0.6)) for k in plan.ks}
  cells = Cells()
  return cells.asked, reproduce.overlap(cells, chosen)


def _keys(todo):
  return {
    (i["K"], i["fragments"], i["tau"], i["adoption"], i["alpha"], i["seed"])
    for _, i in todo.values()
  }


def test_overlap_stage_is_the_stated_grid():
  """Seed 0: K in {4, 8} x F in {2, 4} x (tau=0 once + tau in {1, 2} x both adoptions x alpha in
  {0, 0.5}) = 36 cells; then seeds 1 and 2 at tau=0 and at each adoption's default alpha (the
  lower mean seed-0 gap): 40 cells.  No training."""
  from experiments import reproduce

  (first, second), out = _overlap_stage(reproduce.Plan())
  kf = [(k, f) for k in (4, 8) for f in (2, 4)]
  adoptions, alphas = ("replace", "keep_progress"), (0.0, 0.5)
  assert _keys(first) == {(k, f, 0, None, None, 0) for k, f in kf} | {
    (k, f, tau, a, alpha, 0) for k, f in kf for tau in (1, 2) for a in adoptions for alpha in alphas
  }
  assert len(first) == 36
  default = {"replace": 0.5, "keep_progress": 0.0}
  assert _keys(second) == {(k, f, 0, None, None, s) for k, f in kf for s in (1, 2)} | {
    (k, f, tau, a, default[a], s)
    for k, f in kf
    for tau in (1, 2)
    for a in adoptions
    for s in (1, 2)
  }
  assert len(second) == 40 and not set(first) & set(second)
  assert set(out[(8, 4, 0, None, None)]) == set(out[(4, 2, 2, "keep_progress", 0.0)]) == {0, 1, 2}
  assert set(out[(4, 2, 2, "keep_progress", 0.5)]) == {0}
  # The overrides: the streaming stage's 4-layer model at K's chosen setting; tau = 0 is plain
  # streaming (the library's adoption and alpha), tau > 0 sets both.
  cells = {_keys({n: c}).pop(): (n, c[0]) for n, c in {**first, **second}.items()}
  name, o = cells[(8, 4, 2, "keep_progress", 0.5, 0)]
  assert name == "muloco_K8_lr0.04_outer1-0.6_L4_F4_tau2_keep_progress_a0.5_s0"
  assert o == {
    "optimizer.name": "muon",
    "optimizer.learning_rate": 0.04,
    "optimizer.adam_learning_rate": reproduce.common.MUON_ADAM_LR,
    "diloco.num_workers": 8,
    "diloco.outer_lr": 1.0,
    "diloco.outer_momentum": 0.6,
    "seed": 0,
    "model.num_layers": 4,
    "diloco.num_fragments": 4,
    "diloco.overlap_steps": 2,
    "diloco.adoption": "keep_progress",
    "diloco.mixing": 0.5,
  }
  name, o = cells[(4, 2, 0, None, None, 1)]
  assert name == "muloco_K4_lr0.04_outer0.7-0.6_L4_F2_tau0_s1"
  assert o["diloco.overlap_steps"] == 0 and "diloco.adoption" not in o and "diloco.mixing" not in o


def test_overlap_stage_smoke_grid():
  """--smoke: K=2, F=2, tau in {0, 1}: 5 cells on seed 0, 3 on seed 1."""
  from experiments import reproduce

  (first, second), _ = _overlap_stage(reproduce.SMOKE_PLAN)
  assert (len(first), len(second)) == (5, 3)
  assert {i["K"] for _, i in (*first.values(), *second.values())} == {2}


@pytest.mark.slow
def test_directional_correctness_smoke(tmp_path):
  out, _ = _run_script("directional_correctness.py", tmp_path, "--ks=2,4")
  rows = _check_outputs(out / "directional", ["cosine_vs_k.png", "cosine_per_layer.png"])
  assert {(r["optimizer"], r["K"]) for r in rows} == {
    (o, k) for o in ("adamw", "muon") for k in (2, 4)
  }
  assert all(-1.0 <= r["mean_matrix_cosine"] <= 1.0 for r in rows)


@pytest.mark.slow
def test_wallclock_runs_smoke(tmp_path):
  # Two of the five runs keep it short: DP (bytes from --param_bytes) and a compressed
  # reduce_scatter MuLoCo run (bytes rescaled from the logged payloads to the 150m preset).
  out, _ = _run_script("wallclock_runs.py", tmp_path, "--cells=DP-Muon,MuLoCo-K8-2bit")
  sweep = out / "wallclock"
  for f in ("results.json", "table.md", "wallclock.png"):
    assert (sweep / f).stat().st_size > 0, f
  assert (sweep / "wallclock.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  result = json.loads((sweep / "results.json").read_text())
  dp, muloco = result["runs"]
  assert (dp["run"], dp["K"], muloco["run"], muloco["K"]) == ("DP-Muon", 0, "MuLoCo-K8-2bit", 8)
  assert result["bandwidths"] == [1.25e8, 1.25e10]
  bytes_ = result["modelled_bytes"]["MuLoCo-K8-2bit"]
  assert bytes_["per_worker_bytes"] > 100 * bytes_["run_per_worker_bytes"]  # 150m vs tiny
  assert muloco["bytes_per_worker_per_sync"] == bytes_["per_worker_bytes"]
  assert dp["bytes_per_worker_per_sync"] == 2 * 7 / 8 * result["param_bytes"]
  for bw in ("1.25e+08", "1.25e+10"):
    assert muloco["total_seconds"][bw] < dp["total_seconds"][bw]
  metrics = (sweep / "runs_150m" / "MuLoCo-K8-2bit" / "metrics.jsonl").read_text()
  assert "logged_sync_bytes_per_worker" in metrics
  assert "python -m muloco_jax.tools.wallclock" in (sweep / "table.md").read_text()


def _python3_kernel(tmp_path):
  """A kernel spec for this interpreter, so a fresh venv needs no `ipykernel install`."""
  spec_dir = tmp_path / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(
    json.dumps(
      {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3",
        "language": "python",
      }
    )
  )
  return str(tmp_path)


@pytest.mark.slow
def test_notebook_executes(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  path = os.path.join(EXPERIMENTS, "muloco_vs_diloco.ipynb")
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  monkeypatch.setenv("MULOCO_NB_STEPS", "12")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend makes the PNG
  # JUPYTER_PATH is searched first: "python3" is this interpreter even in a fresh venv.
  monkeypatch.setenv("JUPYTER_PATH", _python3_kernel(tmp_path))
  client = nbclient.NotebookClient(
    nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs)
  text = "".join(o.get("text", "") for o in outputs)
  assert "MuLoCo (Muon inner): final eval loss" in text


def test_notebook_is_valid_nbformat():
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(os.path.join(EXPERIMENTS, "muloco_vs_diloco.ipynb"), as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  assert any("train_and_evaluate" in c.source for c in nb.cells if c.cell_type == "code")
