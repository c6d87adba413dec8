"""The dispatch protocol's state machine (tests/test_protocol_dispatch.py) run with many more
examples than the suite's, from a seed; prints its verdict as JSON:

  hack/protocol-check [--examples 2000] [--steps 40] [--seed 0]

{examples, steps, failures, seconds, and on a failure the shrunk sequence of steps Hypothesis
printed}. Exits 1 when the protocol broke a promise.
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
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

import hypothesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.stateful import get_state_machine_test  # noqa: E402
from test_protocol_dispatch import QuiescentProtocol  # noqa: E402


class Counted(QuiescentProtocol):
    examples = steps = 0

    def __init__(self):
        super().__init__()
        Counted.examples += 1

    def note(self, *step):
        Counted.steps += 1
        super().note(*step)


def check(examples: int, steps: int, seed: int) -> dict:
    logging.disable(logging.CRITICAL)  # the machine's faults are logged by the thousand
    started = time.monotonic()
    verdict = {"seed": seed, "failures": 0}
    test = get_state_machine_test(
        Counted,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            hypothesis.seed(seed)(test)()
    except Exception as failure:  # an AssertionError, or a group of them
        verdict["failures"] = 1
        verdict["error"] = first_assertion(failure)
        lines = notes_of(failure) or printed.getvalue().splitlines()
        last = max((n for n, line in enumerate(lines) if line.startswith("state =")), default=0)
        verdict["shrunk"] = [line for line in lines[last:] if line.startswith("state.")]
    verdict.update(
        examples=Counted.examples,
        steps=Counted.steps,
        seconds=round(time.monotonic() - started, 1),
    )
    return verdict


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
    verdict = check(**vars(parser.parse_args(argv)))
    print(json.dumps(verdict, indent=2))
    return 1 if verdict["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
