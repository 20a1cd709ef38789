"""pdflow's vLLM KV connector and what only vLLM needs: the connector (scheduler half, save path, load path),
the paged KV layout, layered copies beside the forward pass, migration pushes of whole blocks, the codec
chooser bound to a layout, and vLLM's NixlConnector adapted as the baseline. The only part of
``kv_transfer`` that imports vLLM."""
