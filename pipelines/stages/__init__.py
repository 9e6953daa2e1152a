"""The pipeline's stages, one module each: collect, validate, prepare, train, evaluate, compress, report, package,
promote, deploy. A stage module never imports another; what stages share lives in the building blocks beside this
package (config, io, sources, transform, models, bundle, metrics, registry, serving)."""
