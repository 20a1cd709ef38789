"""The prefill pool's worker: a Ray actor hosting one engine that computes prompts and their first token and
hands the prompt's KV to the decode worker the front door chose. The engine host and the worker base it
shares with the decode pool live in ``engine``."""
