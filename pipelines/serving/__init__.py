"""Everything the HTTP service needs beyond the model, one concern a module: the request and answer schemas
(schema.py), API keys (keys.py), canary and shadow routing (routing.py), the ASGI gateway that enforces them
(gateway.py), the typed prediction log (predlog.py), and the BentoML plumbing (bento.py) that package,
deploy and `amaas serve` share. `bentos/service.py` wires them into BentoML."""
