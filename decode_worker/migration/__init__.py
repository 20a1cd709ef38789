"""Live migration of running requests between decode workers (Llumnix-style multi-stage pre-copy): the
relay of a request's token stream that can freeze and hand over (``stream``) and the source's side of a
migration (``source``). The destination's side is a decode request whose KV handle names the moved parts."""
