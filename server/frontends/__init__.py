"""How requests arrive: the gRPC servicer (KServe v2 / Triton protocol) and its protobuf codec, the
KServe v2 REST app, and the OpenAI-style endpoints. Thin: they translate to and from
:mod:`modelyard.server.types` and call the repository; no logic of their own."""
