"""The prefill pool's worker: a Ray actor hosting one vLLM engine that computes prompts and their first
token, then holds the prompt's KV blocks until a decode worker has pulled them. It also holds the vLLM engine
host and the worker base that the decode worker shares (``engine``, ``worker``)."""
