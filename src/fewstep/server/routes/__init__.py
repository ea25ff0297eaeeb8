"""Thin FastAPI routers, one module per concern: parse (protocol models), convert in a worker
thread, hand the core request to the backend, shape the answer. No route touches an engine,
a queue or a thread."""
