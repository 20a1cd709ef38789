"""How pdflow's processes find and call each other on Ray: the namespace and names of the well-known actors,
and one cached directory of actor handles whose calls all carry a deadline. The only Ray plumbing the
controller, the front door's actor shell and the workers share; and what their gRPC servers check before a
handler runs (the caller's credential, a request that parses). It imports nothing of pdflow but the
contracts."""
