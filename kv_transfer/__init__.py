"""KV transfer between engines: codecs, transports and pdflow's vLLM KV connector. Knows nothing of the
controller or the workers; the workers name the connector in their vLLM config."""
