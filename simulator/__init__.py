"""Cluster-scale what-if runs without a model: a discrete-event cluster simulator, a simulated engine that
implements the engine Protocol with a latency cost model, and loaders for real request traces (Azure LLM
inference traces) that both the simulator and ``pdctl bench`` replay. It imports nothing of Ray, vLLM or
Kubernetes."""
