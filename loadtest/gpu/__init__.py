"""The one-shot GPU benchmark (`scripts/gpu-bench.sh`, loadtest/GPU.md).

Modules, each importing only those before it: `plan` (what is measured, budgets, where a
phase writes), `phases` (models, model alone, served), `live` (live calls per GPU),
`report`, `bench` (the entry point: runs each phase in its own process, then the report).
"""
