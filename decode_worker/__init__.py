"""The decode pool's worker: a Ray actor hosting one engine that loads a prefilled request's KV (pushed to it
by the prefill worker), continues decoding it and streams the tokens back. It owns its running requests and
their KV blocks, and both sides of each live migration (``decode_worker.migration``). The engine host and the
worker base it shares with the prefill pool live in ``engine``."""
