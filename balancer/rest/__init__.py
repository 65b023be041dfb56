"""The balancer's REST data plane: an HTTP/1.1 relay to the replicas' HTTP ports (see ``proxy.py``)."""
