"""Command-line tools built on the library (absl flags, `python -m muloco_jax.tools.NAME`):
`aot` (compile for TPU topologies not attached), `wallclock` (modelled wall-clock of finished
runs) and `benchmarks.*`.  Tools import the library; the library never imports a tool."""
