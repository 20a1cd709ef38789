"""The actuators that size the pools: Ray actors (``ray_actors``, on the local Ray cluster or any other, with
workers that switch roles in place, ``switchable``) and the Kubernetes scale subresource (``kubernetes``,
the only code that imports ``kubernetes``). The policy they carry out is ``policy.scaling``; the loop that
drives them is ``controller.autoscaling``."""
