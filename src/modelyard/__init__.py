"""modelyard: a gRPC model server, a sidecar load balancer and an autoscaler.

The components live in top-level folders of the repository and install as
``modelyard.server``, ``modelyard.balancer``, ``modelyard.autoscaler``,
``modelyard.clients`` and ``modelyard.protos``.
"""

__version__ = "0.1.0"
