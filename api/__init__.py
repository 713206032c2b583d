"""The OpenAI-compatible HTTP API: FastAPI on uvicorn, sharing the worker's inference engine."""
