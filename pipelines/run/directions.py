"""``python -m pipelines.run.directions [overrides]``: the pipeline up to the directions stage (earlier stages are reused)."""

from pipelines.run import run_main

if __name__ == "__main__":
    run_main("directions")
