"""A long fuzz run of the request validators (not part of `make test`).

    python -m bench.fuzz_validators --examples 20000

Runs the properties of tests/unit/test_hostile_validation.py with many more examples:
every validator either accepts a request or raises RequestInvalid, and what it accepts is
within the documented bounds. Prints each property's progress and a summary; exits 1 when
a property fails (Hypothesis prints the smallest failing request).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, settings

from tests.unit import test_hostile_validation as properties

PROPERTIES: dict[str, Callable[..., Any]] = {
    "check_shape (GenerateRequest)": (
        properties.test_check_shape_accepts_or_refuses_with_field_violations
    ),
    "check_generation (Complete)": properties.test_check_generation_accepts_or_refuses,
    "_check_admit (AdmitRequest)": properties.test_check_admit_bounds_token_counts,
    "check_store (StoreRequest)": properties.test_check_store_accepts_or_refuses,
    "JSON depth (tool schemas)": properties.test_json_checks_never_recurse_too_deep,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz Strata's request validators.")
    parser.add_argument("--examples", type=int, default=20_000, help="examples per property")
    parser.add_argument("--derandomize", action="store_true", help="the same examples on every run")
    args = parser.parse_args(argv)

    failed = []
    started = time.monotonic()
    for name, prop in PROPERTIES.items():
        # The properties carry the unit tests' settings; a bench run widens them in place
        # (Hypothesis reads this attribute when the test runs).
        attribute = "_hypothesis_internal_use_settings"
        setattr(
            prop,
            attribute,
            settings(
                getattr(prop, attribute),
                max_examples=args.examples,
                database=None,
                derandomize=args.derandomize,
                phases=[Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
            ),
        )
        print(f"{name}: {args.examples} examples ...", flush=True)
        began = time.monotonic()
        try:
            prop()
        except Exception:
            traceback.print_exc()
            failed.append(name)
            print(f"  FAILED after {time.monotonic() - began:.1f} s", flush=True)
        else:
            print(f"  ok in {time.monotonic() - began:.1f} s", flush=True)
    total = len(PROPERTIES)
    print(
        f"\n{total - len(failed)}/{total} properties held over {args.examples} examples each "
        f"in {time.monotonic() - started:.1f} s"
    )
    for name in failed:
        print(f"  FAILED: {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
