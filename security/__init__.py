"""Transport security, caller identity and per-client limits, independent of any protocol.

Shared by ``modelyard serve`` and (later) ``modelyard balance``; nothing here imports the server,
the balancer, gRPC servicers or aiohttp:

- :mod:`modelyard.security.config` -- the settings (``tls``, ``auth``, ``rate_limit`` sections of
  a config file), dataclasses for the one config loader;
- :mod:`modelyard.security.files` -- files watched for changes and reloaded in a thread
  (a bad new version is logged and the last good one kept);
- :mod:`modelyard.security.tls` -- certificate/key/client-CA bundles, reloadable, as gRPC server
  credentials and as an :class:`ssl.SSLContext` whose certificate follows the files;
- :mod:`modelyard.security.tokens` -- bearer tokens from a file or the environment, checked in
  constant time, each with allow lists of models and admin operations;
- :mod:`modelyard.security.ratelimit` -- per-client token buckets, bounded in memory.
"""
