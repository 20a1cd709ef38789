"""``pdctl``, the operator CLI: a client of ``pdflow.v1.Admin`` and the OpenAI API, and the launcher of a
local cluster (Ray head, controller, workers, front door) on one machine, with the model cache it needs."""
