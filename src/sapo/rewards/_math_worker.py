"""Entry point of a math-verify worker process (see math_answers.MathChecker)."""

import sys

from sapo.rewards.math_answers import _serve

if __name__ == "__main__":
    _serve(int(sys.argv[1]))
