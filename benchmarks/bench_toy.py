"""Issue-2 bars for the embedded toy model: judge accuracy on held-out real images and how often
base-model generations show the prompted concept, per kind, on training-style prompts and on
held-out paraphrases (fixed seeds, default guidance). Prints a Markdown table.

    python benchmarks/bench_toy.py [--seeds 8] [--json out.json]
"""
import sys

from patchforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["toy", "report", *sys.argv[1:]]))
