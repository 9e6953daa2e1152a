"""The pipeline's stages, one module each: collect, validate, prepare, train, evaluate, compress, report, package,
promote, deploy. A stage module never imports another; what stages share lives in the building blocks beside this
package (config, io, sources, transform, models, bundle, metrics, registry, serving)."""

# The stages in the order they run (dvc.yaml, the DAGs, `amaas run`); plain names, so that the console script can
# tell a stage command without importing anything (pipelines.entry).
STAGES = ("collect", "validate", "prepare", "train", "evaluate", "compress", "report", "package", "promote", "deploy")
