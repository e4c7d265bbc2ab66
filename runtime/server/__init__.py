"""The OpenAI-compatible HTTP server on the AsyncEngine (Starlette on uvicorn).

    settings.py    ServerSettings: listen address, API keys, every limit and timeout, logging
    protocol.py    request bodies → GenerationRequest (SamplingParams and all), 400s for bad fields, limits
    prompts.py     prompts → token ids off the event loop, after size bounds; chat templates
    generation.py  admission (429), one request's sequences in the engine, aborts on disconnect
    responses.py   engine outputs → OpenAI response bodies and stream chunks, logprobs, usage
    app.py         routes, API keys, the two ways to answer (JSON or server-sent events)
    errors.py      OpenAI's error shape
    metrics.py     Prometheus metrics (`llmctl:` + vLLM's names); grafana-dashboard.json charts them
    access_log.py  one structured line per request; client-chosen values clipped and escaped
    lifecycle.py   loading / serving / stalled / draining / stopped: /health, /ready, shutdown expiry
    connections.py header timeout, connection cap, huge heads, accept errors (an h11 protocol subclass)
    launch.py      uvicorn, the model loading behind the open port, SIGTERM, exit 1 when the engine dies
"""
