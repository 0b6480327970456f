"""The reproduction's verdict rule and the findings' signs (experiments/findings.py)."""

import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import findings


@pytest.mark.parametrize(
  "effects, expected",
  [
    ([0.10, 0.11, 0.09], "reproduced"),
    ([-0.10, -0.11, -0.09], "contradicted"),
    ([0.10, -0.08, 0.02], "inconclusive"),
    ([0.5], "inconclusive"),  # one seed decides nothing
    ([], "inconclusive"),
  ],
)
def test_verdict_rule(effects, expected):
  mean, std, n, verdict = findings.verdict(effects)
  assert (n, verdict) == (len(effects), expected)
  if effects:
    assert mean == pytest.approx(np.mean(effects))
  if n > 1:
    assert std == pytest.approx(np.std(effects, ddof=1))


def test_verdict_threshold_is_two_standard_errors():
  base = np.array([-1.0, 0.0, 1.0])  # std 1, n 3: the bar is 2 / sqrt(3)
  bar = 2 / math.sqrt(3)
  assert findings.verdict(base + bar * 1.01)[3] == "reproduced"
  assert findings.verdict(base + bar * 0.99)[3] == "inconclusive"
  assert findings.verdict(base - bar * 1.01)[3] == "contradicted"


def test_paired_uses_the_seeds_every_run_has():
  a, b = {0: 3.0, 1: 2.0, 2: 5.0}, {1: 1.5, 2: 4.0, 3: 0.0}
  assert findings.paired(lambda x, y: x - y, a, b) == [0.5, 1.0]


def _run(loss):
  return {"final_eval_loss": loss, "wall_seconds": 1.0}


def _chosen(losses):
  """{(method, K): per-seed losses} -> the structure reproduce.choose returns."""
  return {
    key: dict(lr=0.01, outer=(0.7, 0.9), grid=[], seeds={s: _run(v) for s, v in enumerate(vals)})
    for key, vals in losses.items()
  }


def test_findings_are_signed_so_that_the_papers_claim_is_positive(tmp_path):
  noise = np.array([0.0, 0.001, -0.001])
  losses = {
    ("dp_adamw", 0): 2.0 + noise,
    ("dp_muon", 0): 1.9 + noise,
    ("diloco", 1): 2.1 + noise,  # worse than DP AdamW: contrary to the paper
    ("muloco", 1): 1.9 - 0.0001 * np.arange(3),
    ("diloco", 8): 2.5 + noise,
    ("muloco", 8): 2.0 - noise,
  }
  chosen = _chosen(losses)
  none = losses[("muloco", 8)]
  runs = {
    "compression": {
      ("stat4", True): {s: _run(v) for s, v in enumerate(none + 0.001)},
      ("stat4", False): {s: _run(v) for s, v in enumerate(none + 0.2 + noise)},
    },
    "streaming": {f: {s: _run(v) for s, v in enumerate(none + d)} for f, d in ((1, 0), (4, 0.5))},
  }
  items = {f["finding"]: f for f in findings.findings(chosen, runs)}
  by_start = lambda text: next(v for k, v in items.items() if k.startswith(text))
  assert by_start("DP Muon reaches")["verdict"] == "reproduced"
  assert by_start("DP Muon reaches")["effect_mean"] == pytest.approx(0.1)
  assert by_start("DiLoCo K=1")["verdict"] == "contradicted"
  assert by_start("MuLoCo beats DiLoCo at K=8")["verdict"] == "reproduced"
  gap = by_start("MuLoCo's gap to its DP baseline grows less than DiLoCo's from K=1 to K=8")
  assert gap["effect_mean"] == pytest.approx((2.5 - 2.1) - (2.0 - 1.9), abs=1e-3)
  assert by_start("MuLoCo K=8, statistical 4-bit")["verdict"] == "reproduced"  # +0.001 < 0.5%
  assert by_start("Error feedback helps MuLoCo K=8 with statistical 4-bit")["verdict"] == (
    "reproduced"
  )
  assert by_start("Streaming MuLoCo with F=4")["verdict"] == "contradicted"
  # Compressors that did not run are reported with no seeds, not dropped.
  assert by_start("MuLoCo K=8, linear 2-bit, per row")["n_seeds"] == 0
  assert by_start("MuLoCo K=8, linear 2-bit, per row")["verdict"] == "inconclusive"


def test_report_writes_the_summary_and_the_readme_block(tmp_path):
  chosen = _chosen({("dp_adamw", 0): [2.0, 2.01], ("dp_muon", 0): [1.9, 1.92]})
  out = tmp_path / "results"
  items = findings.report(chosen, {}, out=str(out))
  summary = json.loads((out / "summary.json").read_text())
  assert summary == json.loads(json.dumps(items))
  keys = {"finding", "paper", "effect_mean", "effect_std", "n_seeds", "verdict"}
  assert all(keys <= set(f) for f in summary)
  table = (out / "reproduction" / "summary.md").read_text()
  assert "DP Muon reaches a lower loss than DP AdamW" in table
  readme = tmp_path / "README.md"
  readme.write_text(f"head\n{findings.BEGIN}\nold\n{findings.END}\ntail\n")
  findings.replace_block(str(readme), "new table")
  assert readme.read_text() == f"head\n{findings.BEGIN}\nnew table\n{findings.END}\ntail\n"


def test_the_verdict_block_lives_in_experiments_readme_only():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "README.md")) as f:
    assert findings.BEGIN not in f.read()  # the top-level README links to experiments/README.md
  with open(os.path.join(root, "experiments", "README.md")) as f:
    doc = f.read()
  assert doc.count(findings.BEGIN) == doc.count(findings.END) == 1
