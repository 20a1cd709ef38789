"""Autoscaling of both pools on one metric (decode tokens/s): signal readers, the pure ``decide`` policy,
and the actuators (Ray actors locally, the Kubernetes scale subresource in a cluster). The only package that
imports ``kubernetes``. Not built yet: see the open autoscaling issue."""
