"""Observing a run: one span schema with its sinks, overlap metrics, figures, live plots, the
torch profiler and the self-contained report."""
