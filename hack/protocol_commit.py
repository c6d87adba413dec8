#!/usr/bin/env python3
"""The commit protocol's and the drain's state machines (tests/test_protocol_commit.py) for many
more examples than the suite runs, from a seed; prints the verdict as JSON (examples, steps,
failures, each with the shrunk sequence Hypothesis printed).

  .venv/bin/python hack/protocol_commit.py --seed 1 --examples 2000
"""

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "hack")]

import test_protocol_commit as machines  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import seed as with_seed  # noqa: E402
from hypothesis.stateful import invariant, run_state_machine_as_test  # noqa: E402


def counted(machine):
    """`machine` with a count of its examples and steps (its invariants run after each)."""

    class Counted(machine):
        examples = checks = 0

        def __init__(self):
            super().__init__()
            type(self).examples += 1

        @invariant()
        def count(self):
            type(self).checks += 1

    Counted.__name__ = machine.__name__
    return Counted


def check(machine, seed: int, examples: int, steps: int) -> dict:
    run = with_seed(seed)(counted(machine))
    shown = io.StringIO()
    failure = None
    try:
        with contextlib.redirect_stdout(shown):
            run_state_machine_as_test(
                run,
                settings=settings(
                    max_examples=examples,
                    stateful_step_count=steps,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                ),
            )
    except Exception as exc:  # the property failed: Hypothesis shrank and printed it
        failure = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}", "shrunk": shown.getvalue()}
    return {
        "machine": machine.__name__,
        "examples": run.examples,
        "steps": run.checks - run.examples,
        "failure": failure,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    runs = [
        check(machine, args.seed, args.examples, args.steps)
        for machine in (machines.CommitProtocol, machines.Deliveries)
    ]
    failures = [r for r in runs if r["failure"]]
    print(
        json.dumps(
            {
                "seed": args.seed,
                "examples": sum(r["examples"] for r in runs),
                "steps": sum(r["steps"] for r in runs),
                "failures": failures,
                "machines": [{k: v for k, v in r.items() if k != "failure"} for r in runs],
            },
            indent=2,
        )
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
