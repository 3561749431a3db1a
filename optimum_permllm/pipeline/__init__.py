"""Model-level machinery: structure discovery, the layer-by-layer engine, folding."""
