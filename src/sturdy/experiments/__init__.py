"""Orchestration that trains and measures: the demo, training jobs, and each part's CLI and report section."""
