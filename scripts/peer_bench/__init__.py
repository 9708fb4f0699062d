"""The peer benchmark behind scripts/bench_peers.py (whose docstring says what it measures)."""
