"""Model serving: the registry of loaded boxes and the dynamic batcher, runtime tuning and model loading."""
