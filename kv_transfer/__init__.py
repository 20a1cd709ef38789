"""KV transfer between engines: ``codec/`` (pure encoders), ``transport/`` (NIXL and an in-process fake),
``exchange/`` (engine-agnostic transfers between two workers' endpoints) and ``vllm/`` (pdflow's vLLM KV
connector, the only part that imports vLLM). Knows nothing of the controller, the front door or the
workers; the engine host names the connector in its vLLM config."""
