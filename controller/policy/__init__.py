"""Pure policies: ``decide(snapshot, state, ...) -> (plan, state)``. No Ray, gRPC or clocks inside."""
