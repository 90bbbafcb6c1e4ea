"""``python -m pipelines.run.aggregate [overrides]``: the pipeline up to the aggregate stage (earlier stages are reused)."""

from pipelines.run import run_main

if __name__ == "__main__":
    run_main("aggregate")
