"""Where a step's time goes: time by op type and the slowest nodes."""

from __future__ import annotations

from collections import defaultdict


class Profile:
    """Accumulates kernel times of the runs it is passed to.

    Give one to a trainer (``trainer.profile = onnxgrad.Profile()``) and
    every step adds to it; ``str(profile)`` is a report.
    """

    def __init__(self):
        self.node_seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.node_calls: dict[tuple[str, str], int] = defaultdict(int)
        self.optimizer_seconds = 0.0
        self.steps = 0
        #: Lines the report ends with (e.g. how a GPU ran the steps).
        self.notes: list[str] = []

    def add(self, node_name: str, op_type: str, seconds: float) -> None:
        key = (node_name, op_type)
        self.node_seconds[key] += seconds
        self.node_calls[key] += 1

    def by_op(self) -> list[tuple[str, float, int]]:
        """(op type, seconds, calls), slowest first."""
        seconds: dict[str, float] = defaultdict(float)
        calls: dict[str, int] = defaultdict(int)
        for (_, op_type), s in self.node_seconds.items():
            seconds[op_type] += s
            calls[op_type] += self.node_calls[(_, op_type)]
        return sorted(((k, v, calls[k]) for k, v in seconds.items()), key=lambda r: -r[1])

    def report(self, top: int = 10) -> str:
        kernels = sum(self.node_seconds.values())
        total = kernels + self.optimizer_seconds
        steps = max(self.steps, 1)
        if total == 0:
            return "profile: nothing recorded"
        lines = [f"profile over {self.steps} step(s): {1e3 * total / steps:.2f} ms per step in "
                 f"kernels and optimizer",
                 f"  {'op type':<34} {'ms/step':>9} {'share':>6} {'calls/step':>10}"]
        rows = self.by_op() + [("(optimizer update)", self.optimizer_seconds, self.steps)]
        for op_type, s, calls in sorted(rows, key=lambda r: -r[1]):
            lines.append(f"  {op_type:<34} {1e3 * s / steps:9.3f} {100 * s / total:5.1f}% "
                         f"{calls / steps:10.1f}")
        lines.append(f"  top {top} nodes:")
        slowest = sorted(self.node_seconds.items(), key=lambda kv: -kv[1])[:top]
        for (name, op_type), s in slowest:
            lines.append(f"  {name[:50]:<50} {op_type:<32} {1e3 * s / steps:9.3f} ms")
        lines += self.notes
        return "\n".join(lines)

    __str__ = report
