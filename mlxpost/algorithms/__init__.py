"""One module per algorithm: config dataclass, the math, the loop."""
