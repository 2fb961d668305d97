"""Where text comes from and how it becomes token files: `sources.py` (every kind of --data),
`builtin.py` (the offline default corpus), `prepare.py` (tokenize once, cache, memory-map) and
`loader.py` (the batches training draws from them).
"""
