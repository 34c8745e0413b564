"""Benchmark scripts: one per subject, CSV + PNG out, ratios against a peer in the same run."""
