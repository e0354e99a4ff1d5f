"""Benchmarks behind ``pagoda bench``: offline throughput, single-batch latency, a serving client, and a
per-step engine-overhead profile. Each module has ``add_cli_args(parser)`` and ``main(args)``."""
