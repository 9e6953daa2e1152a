"""amaas: AutoML as a service: the pipeline's stages, its registry, serving and monitoring (see README.md)."""
