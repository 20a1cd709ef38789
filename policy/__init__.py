"""Every pure decision pdflow makes: dispatch (which prefill and decode worker take a request), migration
(which running request moves where), freeness (the one load formula both use), the KV codec for a link and
the stages of a live migration's pre-copy. Each takes frozen snapshots, its own state and ``now``, and
returns a typed plan and its new state; nothing here does I/O or reads a clock. Imports ``protocol`` only."""
