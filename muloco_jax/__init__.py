"""muloco_jax: MuLoCo (DiLoCo with Muon as the inner optimizer) in JAX/Flax."""
from muloco_jax.optim import (
    CLASSIC_COEFFICIENTS,
    MULOCO_COEFFICIENTS,
    FLAX_DIMENSION_NUMBERS,
    MuonDimensionNumbers,
    ScaleByMuonState,
    fan_in_fan_out,
    muon,
    muon_labels,
    newton_schulz_coefficients,
    orthogonalize,
    scale_by_muon,
)
