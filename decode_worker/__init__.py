"""The decode pool's worker: a Ray actor hosting one vLLM engine that receives a prefilled request's KV over
NIXL, continues decoding it and streams the tokens back. It owns its running requests and their KV blocks,
and both sides of each live migration (``decode_worker.migration``)."""
