"""Watchout: a real-time relay for camera frames and ML alerts over WebSocket."""

__version__ = "0.1.0"
