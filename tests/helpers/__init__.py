"""What the tests share, by concern: `server` (tiny models, one engine, apps, a live server,
gates), `ray_cluster` (a small local Ray instance and a gated engine for its replicas),
`studio` (Chromium and the page), `fakes` (an engine and backend stand-ins implementing the
protocols), `cli` (one-line errors, the model flags) and `models` (weight fingerprints)."""
