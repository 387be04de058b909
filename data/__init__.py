"""Data: Qwen tokenizer, webdataset token shards (prepare), streaming loader and packing."""
