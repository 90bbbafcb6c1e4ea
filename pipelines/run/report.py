"""``python -m pipelines.run.report [overrides]``: the pipeline up to the report stage (earlier stages are reused)."""

from pipelines.run import run_main

if __name__ == "__main__":
    run_main("report")
