"""Test set-up: 8 virtual CPU devices so meshes are real multi-device meshes."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # after the flags above: they take effect at its first backend use
from jax.experimental.compilation_cache import compilation_cache
import pytest


@pytest.fixture(scope="module")
def shared_compilation_cache(tmp_path_factory):
  """A persistent compilation cache for one test module, whose runs compile the same programs:
  the later runs read them from it (use with `pytestmark = pytest.mark.usefixtures(...)`)."""
  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  saved = {name: jax.config.values[name] for name in names}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))  # kjv is built (byte tokens) by the first run
