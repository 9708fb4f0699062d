"""One row of the report: a (task, model, tool) measurement as the parent keeps it."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def throughput(units_per_step: float, step_seconds: list[float]) -> float:
    """Units per second over the timed steps (total units / total seconds)."""
    total = sum(step_seconds)
    return units_per_step * len(step_seconds) / total if total > 0 else float("nan")


@dataclass
class Result:
    task: str
    model: str
    framework: str
    tool: str
    shape: str
    status: str  # ok | not available | failed
    reason: str = ""
    warmup: int = 0
    steps: int = 0
    step_seconds: list = field(default_factory=list)
    step_cpu_seconds: list = field(default_factory=list)  # CPU time of the process (all threads)
    warmup_seconds: list = field(default_factory=list)
    units: str = ""  # tokens | pairs | steps
    units_per_step: float = 0.0
    peak_rss_mib: float | None = None
    alloc_peak_mib: float | None = None
    extra: dict = field(default_factory=dict)
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.step_seconds)

    def rate(self) -> float:
        return throughput(self.units_per_step, self.step_seconds) if self.ok else float("nan")

    def median_step(self) -> float:
        return statistics.median(self.step_seconds) if self.ok else float("nan")

    def cpu_per_wall(self) -> float:
        """CPU seconds per wall second in the timed steps: about the threads kept busy; far
        below the thread count means the process waited (other load, or stopped)."""
        if not self.ok or len(self.step_cpu_seconds) != len(self.step_seconds):
            return float("nan")
        return sum(self.step_cpu_seconds) / sum(self.step_seconds)

    def sampling(self) -> dict:
        """GRPO: completion tokens per step, sampling tokens/s and the share of step time."""
        tokens = self.extra.get("completion_tokens", [])
        seconds = self.extra.get("sampling_seconds", [])
        if not self.ok or not tokens or not seconds:
            return {}
        return {
            "completion_tokens_per_step": sum(tokens) / len(tokens),
            "sampling_tokens_per_s": sum(tokens) / sum(seconds),
            "sampling_share": sum(seconds) / sum(self.step_seconds),
        }

    def merge(self, other: Result) -> None:
        """Pool another repeat of the same measurement (--repeat)."""
        if not other.ok:
            note = f"a repeat {other.status}: {other.reason}"
            self.extra["note"] = "; ".join(filter(None, [self.extra.get("note"), note]))
            return
        if not self.ok:
            note = f"a repeat {self.status}: {self.reason}"
            self.__dict__.update(other.__dict__)
            self.extra["note"] = "; ".join(filter(None, [self.extra.get("note"), note]))
            return
        for name in ("step_seconds", "step_cpu_seconds", "warmup_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.steps += other.steps
        self.wall_seconds += other.wall_seconds
        self.peak_rss_mib = max(filter(None, [self.peak_rss_mib, other.peak_rss_mib]), default=None)
        self.alloc_peak_mib = max(
            filter(None, [self.alloc_peak_mib, other.alloc_peak_mib]), default=None
        )
        for key in ("completion_tokens", "sampling_seconds", "reference_seconds", "tokens"):
            if key in other.extra:
                self.extra[key] = self.extra.get(key, []) + other.extra[key]
