"""The front door: a Ray actor per replica serving the OpenAI-compatible HTTP API and the gRPC Router API. It
validates and tokenizes requests, picks the (prefill, decode) pair with the dispatch policy from the snapshot
the controller pushes, streams the tokens back, and exports the serving metrics. The request router reaches
the workers only through the ``WorkerClient`` interface (``frontdoor.workers``), whose Ray implementation is
its only Ray code."""
