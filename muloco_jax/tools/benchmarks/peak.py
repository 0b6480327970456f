"""The peak matmul rate that MFU divides by, in one place for every benchmark.

Per device: the vendor's dense (no 2:4 sparsity) bf16 figure where the device kind is known
(`DATASHEET_BF16_FLOPS`), otherwise measured: the best rate of large square matmuls of the
compute dtype (dtype x dtype -> dtype), best of several repeats and sizes, each timing a chain of
calls so that dispatch does not dominate.  A measured peak is a lower bound of the real one, so
an MFU against it can only read high; `mfu` refuses a figure over 100%.

On CPU the figure is the host's: virtual CPU devices (--xla_force_host_platform_device_count)
share its cores, so it is not multiplied by the number of devices (`Peak.of`).
"""

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Dense bf16 matmul FLOP/s of one JAX device, keyed on `device.device_kind`.  Sources: NVIDIA's
# H100 architecture whitepaper (SXM5 989.4 TFLOP/s, PCIe 756; the H200 is the H100 SXM's GH100
# with more memory) and A100 datasheet (312); the Cloud TPU system architecture pages (per chip,
# one JAX device from v4 on: v4 275, v5e 197, v5p 459, v6e 918).
DATASHEET_BF16_FLOPS = {
  "NVIDIA H100 80GB HBM3": 989.4e12,  # H100 SXM5
  "NVIDIA H100 PCIe": 756e12,
  "NVIDIA H200": 989.4e12,  # H200 SXM
  "NVIDIA A100-SXM4-40GB": 312e12,
  "NVIDIA A100-SXM4-80GB": 312e12,
  "NVIDIA A100-PCIE-40GB": 312e12,
  "NVIDIA A100 80GB PCIe": 312e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,  # v5e
  "TPU v5": 459e12,  # v5p
  "TPU v6 lite": 918e12,  # v6e (Trillium)
}


class Peak(NamedTuple):
  """Peak matmul FLOP/s of one device (on CPU, of the host) and where the figure comes from."""

  flops: float
  source: str  # "datasheet (DEVICE_KIND)" or "measured (...)"
  platform: str

  def of(self, num_devices: int) -> float:
    """FLOP/s of `num_devices` devices: the host's figure once on CPU (shared cores)."""
    return self.flops if self.platform == "cpu" else self.flops * num_devices


def measured_matmul_flops(
  dtype, device: jax.Device, *, max_size: int = 0, repeats: int = 5, chain: int = 4
) -> tuple[float, int]:
  """(best FLOP/s, the size reaching it) of n x n @ n x n `dtype` matmuls on `device`.

  Sizes double up to `max_size`, by default 8192 (accelerators reach their rate only on large
  matmuls) or 2048 on CPU (already at the host's rate; larger ones only take longer).  Each
  timing runs `chain` matmuls, each on the previous result, dispatched back to back.
  """
  max_size = max_size or (2048 if device.platform == "cpu" else 8192)
  matmul = jax.jit(lambda x, w: x @ w)
  best = (0.0, 0)
  for n in (s for s in (256, 512, 1024, 2048, 4096, 8192) if s <= max_size):
    # Scaled so that a chain of products keeps its magnitude (no overflow, no denormals).
    w = jax.device_put(jax.random.normal(jax.random.key(n), (n, n), dtype) / n**0.5, device)
    jax.block_until_ready(matmul(w, w))  # compile
    times = []
    for _ in range(repeats):
      x = w
      start = time.perf_counter()
      for _ in range(chain):
        x = matmul(x, w)
      jax.block_until_ready(x)
      times.append((time.perf_counter() - start) / chain)
    best = max(best, (2 * n**3 / min(times), n))
  return best


def peak(dtype, device: jax.Device | None = None, *, max_size: int = 0, repeats: int = 5) -> Peak:
  """The datasheet's bf16 figure of `device` (default: the first) if known, else measured."""
  device = device or jax.devices()[0]
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bfloat16 and device.device_kind in DATASHEET_BF16_FLOPS:
    return Peak(
      DATASHEET_BF16_FLOPS[device.device_kind],
      f"datasheet ({device.device_kind})",
      device.platform,
    )
  flops, size = measured_matmul_flops(dtype, device, max_size=max_size, repeats=repeats)
  return Peak(
    flops,
    f"measured ({dtype.name} {size}x{size} matmuls on {device.device_kind}, best of {repeats})",
    device.platform,
  )


def mfu(model_flops_per_sec: float, peak_flops: float, what: str) -> float:
  """Model FLOPs utilization; raises ValueError over 100%, where the peak or the count is wrong."""
  utilization = model_flops_per_sec / peak_flops
  if utilization > 1:
    raise ValueError(
      f"{what}: MFU {100 * utilization:.1f}% > 100% ({model_flops_per_sec:.4g} model FLOP/s "
      f"against a peak of {peak_flops:.4g} FLOP/s): the peak is too low or the FLOP count too "
      "high."
    )
  return utilization
