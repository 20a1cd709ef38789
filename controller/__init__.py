"""The controller and the front door. The controller (one Ray actor) owns the instance registry and health,
the request log and the admin API; the front door serves the OpenAI HTTP and gRPC Router APIs, tokenizes,
and places each request on a (prefill, decode) pair with the pure policies in ``controller.policy``."""
