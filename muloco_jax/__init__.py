"""muloco_jax: MuLoCo (DiLoCo with Muon as the inner optimizer) in JAX/Flax."""
