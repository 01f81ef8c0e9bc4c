"""Test configuration: everything runs offline, single-threaded enough for 2 cores."""

import os

# Before any Hugging Face import: never wait on network timeouts in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
