__version__ = "0.1.0"

import os as _os

# Chapter 08c: OpenMP threads that spin while they wait lose most of a step's time whenever another process
# holds one of the cores; a short spin, then sleep, keeps the quiet speed and bounds that loss. libgomp reads it
# once, when torch loads: it is set here, before any tinyllama module imports torch. A value already set wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "1000")
