"""dcapd: a drop-in Python replacement for Intel's SGX/TDX DCAP PCCS."""

__version__ = "0.1.0"
