"""modelyard: a gRPC model server, a sidecar load balancer and an autoscaler.

The components live in top-level folders of the repository and install as
``modelyard.server``, ``modelyard.balancer``, ``modelyard.autoscaler``,
``modelyard.clients`` and ``modelyard.protos``. This package itself (the ``core/``
folder) holds the few pieces every component shares, each in one place:

- :mod:`modelyard.config` -- the one config loader (dataclasses that own their defaults
  and validate themselves; every error reported with its path);
- :mod:`modelyard.launcher` -- starting a process and knowing it is ready (the
  ``modelyard ready ...`` line), free ports, always stopping;
- :mod:`modelyard.percentiles` -- the one percentile definition (nearest rank);
- :mod:`modelyard.clock` -- injected time.
"""

__version__ = "0.1.0"
