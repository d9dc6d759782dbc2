"""Arrow shards, converters, the streaming reader, processing, packing and the synthetic dataset."""
