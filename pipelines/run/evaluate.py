"""``python -m pipelines.run.evaluate [overrides]``: the pipeline up to the evaluate stage (earlier stages are reused)."""

from pipelines.run import run_main

if __name__ == "__main__":
    run_main("evaluate")
