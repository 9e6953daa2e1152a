"""Everything the HTTP service needs beyond the model, one concern a module: the request and answer schemas
(schema.py), canary and shadow routing (routing.py), the ASGI gateway that enforces keys, limits and schemas
(gateway.py), and the BentoML plumbing (bento.py) that package, deploy and `amaas serve` share.
`bentos/service.py` wires them into BentoML. What servers share (keys, limits, the prediction log, flags) is
reached through `pipelines.state`."""
