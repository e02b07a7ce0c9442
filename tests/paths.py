"""Where the tests find things, wherever a test file sits under tests/."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent  # the checkout
DATA = TESTS / "data"  # small fixtures kept with the tests
SHARED = ROOT.parent / "shared"  # ../shared beside the checkout (WikiText-2, JSONSchemaBench)
