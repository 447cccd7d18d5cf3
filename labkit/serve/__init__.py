"""`labkit serve`: an OpenAI-compatible HTTP server over one engine (app.py), fed by a worker
that owns the engine (worker.py), with incremental detokenisation (detok.py), the wire format
(protocol.py) and Prometheus metrics (metrics.py)."""
