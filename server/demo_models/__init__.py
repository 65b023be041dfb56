"""The embedded default model repository: tiny models that need no torch and load in milliseconds.

``modelyard serve`` with no ``--model-repository`` serves this directory.
"""

from pathlib import Path

DEMO_REPOSITORY = Path(__file__).resolve().parent
