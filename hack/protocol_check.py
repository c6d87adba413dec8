"""The protocols' state machines (tests/test_protocol_dispatch.py: the Cloud Run dispatch;
tests/test_protocol_commit.py: the commit protocol's writers and the drain's deliveries) run
with many more examples than the suite's, from a seed; prints the verdict as JSON:

  hack/protocol-check [--examples 2000] [--steps 40] [--seed 0] [--only dispatch|commit|deliveries]

{seed, examples, steps, failures, seconds, machines: each one's counts and, on a failure, its
error and the shrunk sequence of steps Hypothesis printed}. Exits 1 when a protocol broke a
promise.
"""

import argparse
import contextlib
import io
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO), str(REPO / "hack")]

import hypothesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.stateful import invariant, run_state_machine_as_test  # noqa: E402
from test_protocol_commit import CommitProtocol, Deliveries  # noqa: E402
from test_protocol_dispatch import QuiescentProtocol  # noqa: E402

MACHINES = {"dispatch": QuiescentProtocol, "commit": CommitProtocol, "deliveries": Deliveries}


def counted(machine):
    """`machine` with a count of its examples and steps (an invariant runs after each)."""

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


def check(name: str, examples: int, steps: int, seed: int) -> dict:
    machine = counted(MACHINES[name])
    verdict = {"machine": name}
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            hypothesis.seed(seed)(run_state_machine_as_test)(
                machine,
                settings=settings(
                    max_examples=examples,
                    stateful_step_count=steps,
                    deadline=None,
                    suppress_health_check=list(HealthCheck),
                    database=None,
                ),
            )
    except Exception as failure:  # an AssertionError, or a group of them
        verdict["error"] = first_assertion(failure)
        lines = notes_of(failure) or printed.getvalue().splitlines()
        last = max((n for n, line in enumerate(lines) if line.startswith("state =")), default=0)
        checks = {f"state.{name}()" for name in dir(machine) if is_invariant(machine, name)}
        steps = [line for line in lines[last:] if line.startswith("state.")]
        verdict["shrunk"] = [line for line in steps if line not in checks]
    verdict.update(examples=machine.examples, steps=machine.checks - machine.examples)
    return verdict


def is_invariant(machine, name: str) -> bool:
    """Whether `name` is one of the machine's invariants (checked after every step, so Hypothesis
    prints them between the steps of a shrunk sequence)."""
    return hasattr(getattr(machine, name, None), "hypothesis_stateful_invariant")


def first_assertion(failure: BaseException) -> str:
    for inner in getattr(failure, "exceptions", ()):
        return first_assertion(inner)
    return f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"


def notes_of(failure: BaseException) -> list:
    lines = [line for note in getattr(failure, "__notes__", []) for line in note.splitlines()]
    for inner in getattr(failure, "exceptions", ()):
        lines += notes_of(inner)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in (("--examples", 2000), ("--steps", 40), ("--seed", 0)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--only", choices=sorted(MACHINES), help="one machine (default: all)")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # the machines' faults are logged by the thousand
    started = time.monotonic()
    runs = [
        check(name, args.examples, args.steps, args.seed)
        for name in ([args.only] if args.only else MACHINES)
    ]
    failures = sum(1 for run in runs if "error" in run)
    verdict = {
        "seed": args.seed,
        "examples": sum(run["examples"] for run in runs),
        "steps": sum(run["steps"] for run in runs),
        "failures": failures,
        "seconds": round(time.monotonic() - started, 1),
        "machines": runs,
    }
    print(json.dumps(verdict, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
