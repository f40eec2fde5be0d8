"""Helpers of the benchmark and the GPU check (calibration of candidate counts, ...)."""
