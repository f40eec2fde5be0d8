"""Helpers of the tools: ``measure`` (times, peak memory, FLOPs, conv probe, ratios),
``benchmark_parts`` (benchmarked configs, model parts, exported runtimes, data-loader timing),
``benchmark_calibration`` (random-weight models doing a trained model's post-processing work),
``synthetic`` (deterministic images and training batches) and ``cli`` (command-line overrides)."""
