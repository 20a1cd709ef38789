"""Live migration of running requests between decode workers (Llumnix-style multi-stage pre-copy): the
source's stage plan and stream hand-over (``source``), and the calls it makes inside the vLLM worker through
``collective_rpc`` (``worker_ext``)."""
