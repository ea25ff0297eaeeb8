"""Request and response models of each API the service speaks (native, OpenAI images,
AUTOMATIC1111): what clients send and get, as the OpenAPI schema shows it. No behaviour here:
`server.convert` turns these into core requests and results into these."""
