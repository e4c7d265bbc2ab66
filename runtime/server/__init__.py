"""The OpenAI-compatible HTTP server on the AsyncEngine (Starlette on uvicorn).

    settings.py    ServerSettings: listen address, API key, queue bound, logging, shutdown timeout
    protocol.py    request bodies → GenerationRequest (SamplingParams and all), 400s for bad fields
    generation.py  admission (429), one request's sequences in the engine, aborts on disconnect
    responses.py   engine outputs → OpenAI response bodies and stream chunks, logprobs, usage
    app.py         routes, API keys, the two ways to answer (JSON or server-sent events)
    errors.py      OpenAI's error shape
    metrics.py     Prometheus metrics (`llmctl:` + vLLM's names); grafana-dashboard.json charts them
    access_log.py  one structured line per request
    launch.py      uvicorn, graceful SIGTERM, exit 1 when the engine dies
"""
