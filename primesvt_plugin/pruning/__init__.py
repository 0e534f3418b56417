"""Pruning SpikingJelly models with Torch-Pruning: channels, graph, memory, importance, policy."""
