"""``python -m pipelines.run``: the whole pipeline."""

from pipelines.run import run_main

if __name__ == "__main__":
    run_main()
