"""Role-agnostic engine hosting: the vLLM adapter behind ``protocol.engine``'s contracts, the two ways KV
leaves a prefill engine (pdflow's connector or vLLM's NixlConnector), engine statistics, the vLLM plugin
and worker extension that run inside vLLM's processes, the worker base both pools' actors share, and a fake
engine on the same contracts for tests. vLLM itself is imported only when an engine starts."""
