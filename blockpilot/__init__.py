"""BlockPilot serving: lossless DFlash speculative decoding with an instance-adaptive block size."""

__version__ = "0.1.0"
