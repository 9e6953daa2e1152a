"""Everything the HTTP service needs beyond the model: request schema, API keys, gateway, routing, the
prediction log, and the BentoML plumbing (bento.py) that package, deploy and `amaas serve` share."""
