"""Rotator: the control plane that makes webhook secret rotation safe."""

__version__ = "0.1.0"
