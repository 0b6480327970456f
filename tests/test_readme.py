"""The README's Python examples run as written."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
  with open(README) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_readme_has_examples():
  assert len(_python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
  from muloco_jax import data

  monkeypatch.setattr(data, "DEFAULT_DIR", str(tmp_path / "data"))
  code = _python_blocks()[index].replace("/tmp/muloco_api_run", str(tmp_path / "run"))
  exec(compile(code, f"README.md[{index}]", "exec"), {})
