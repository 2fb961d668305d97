"""The network, its tokenizer, its generation engine and its checkpoints.

Reading order: `tokenizer.py` (text <-> token ids, special tokens), `config.py` (the transformer's shape), `gpt.py` (the transformer),
`engine.py` (generation with a KV cache), `sampling.py` (choosing each next token),
`checkpoint.py` (the folder format on disk), `evaluate.py` (bits per byte, the number runs are
compared by), `export.py` (the same model and tokenizer as a Hugging Face `transformers` folder).
"""
