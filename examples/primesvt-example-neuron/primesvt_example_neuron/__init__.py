"""Example primesvt plugin: a neuron with per-channel thresholds."""
from .neuron import ChannelThresholdLIF

__all__ = ["ChannelThresholdLIF"]
