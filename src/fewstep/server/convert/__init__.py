"""From what clients send (the `protocol` models) to the engine's typed requests, and from
finished jobs to what clients get. Everything here is plain and synchronous: the routes run it
in a worker thread, never on the event loop, because decoding images and parsing prompts take
time in proportion to what a client sent."""
