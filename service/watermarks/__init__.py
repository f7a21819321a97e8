"""Traceable licensees: the watermark secret, the per-API-key marks of /distill-batch, tracing suspects."""
