"""``python -m pipelines.run.checkpoint [overrides]``: the pipeline up to the checkpoint stage (earlier stages are reused)."""

from pipelines.run import run_main

if __name__ == "__main__":
    run_main("checkpoint")
