"""What a compiled step costs and how fast it runs: XLA's FLOPs and memory analysis of the compiled
program, per-chip peak FLOP/s, and images/s and MFU over the steps between two log points.

MFU here is (FLOPs of the compiled per-device program × steps/s) / the chip's peak dense bf16
FLOP/s. The FLOPs are XLA's count of what the chip executes, so remat's recomputation counts
(strictly that is hardware-FLOPs utilisation), and a fused custom call (cuDNN attention) may count
as zero, which understates the figure. Both caveats point the same way: the figure is a floor.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

# Peak dense bf16 FLOP/s per chip, from the vendors' data sheets, matched as substrings of
# ``jax.Device.device_kind`` in this order (the more specific names first: "TPU v5 lite" is v5e,
# "TPU v5" alone v5p). NVIDIA figures are the SXM parts' dense (not 2:4 sparse) tensor-core peaks.
PEAK_BF16_FLOPS = (
    ("TPU v6 lite", 918e12),   # v6e (Trillium)
    ("TPU v5 lite", 197e12),   # v5e
    ("TPU v5", 459e12),        # v5p
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
)


def peak_flops(device_kind: str, override: float = 0.0) -> Optional[float]:
    """The chip's peak bf16 FLOP/s: ``override`` when positive, else from ``PEAK_BF16_FLOPS``;
    ``None`` for a chip not in the table (a CPU): no MFU is reported then."""
    if override > 0:
        return float(override)
    for name, peak in PEAK_BF16_FLOPS:
        if name in device_kind:
            return peak
    return None


@dataclasses.dataclass(frozen=True)
class StepCost:
    """XLA's analysis of one compiled step, per device (the SPMD program each chip runs)."""

    flops: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    backend: str

    @property
    def peak_bytes(self) -> int:
        """Live bytes per device: inputs and outputs (donated state counted once) and temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def summary(self) -> str:
        gib = 2**30
        return (f"compiled step ({self.backend}): {self.flops / 1e12:.3f} TFLOP per device; memory per device: "
                f"arguments {self.argument_bytes / gib:.2f} GiB, outputs {self.output_bytes / gib:.2f} GiB, "
                f"donated {self.alias_bytes / gib:.2f} GiB, temporaries {self.temp_bytes / gib:.2f} GiB "
                f"-> peak {self.peak_bytes / gib:.2f} GiB")


def step_cost(compiled: Any, backend: str) -> StepCost:
    """The ``StepCost`` of a ``jax.stages.Compiled`` for ``backend`` (the devices' platform)."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0]
    return StepCost(flops=float((cost or {}).get("flops", 0.0)),
                    argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                    alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                    generated_code_bytes=int(mem.generated_code_size_in_bytes),
                    backend=backend)


class Throughput:
    """Images/s and MFU over the steps between two ``record`` calls. ``restart`` drops the time
    since the last record (an evaluation ran in between, or the step was just compiled)."""

    def __init__(self, global_batch: int, flops_per_device: float, peak: Optional[float],
                 clock=time.perf_counter):
        self.global_batch, self.flops, self.peak, self._clock = global_batch, flops_per_device, peak, clock
        self._since: Optional[tuple[int, float]] = None

    def restart(self, step: int) -> None:
        self._since = (step, self._clock())

    def record(self, step: int) -> dict:
        """``{images_per_second, steps_per_second[, mfu]}`` since the last record or restart (empty
        if none, or if no step was done since), and restarts there."""
        now, since = self._clock(), self._since
        self._since = (step, now)
        if since is None or step <= since[0] or now <= since[1]:
            return {}
        steps_per_second = (step - since[0]) / (now - since[1])
        out = {"steps_per_second": steps_per_second, "images_per_second": steps_per_second * self.global_batch}
        if self.peak and self.flops:
            out["mfu"] = self.flops * steps_per_second / self.peak
        return out
