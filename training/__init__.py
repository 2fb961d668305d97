"""How a model is trained: `config.py` (every knob, presets, the command line), `optim.py`
(optimizers and the learning-rate schedule), `distributed.py` (torchrun/DDP), `trainer.py` (the
loop: steps, evaluation, samples, checkpoints, metrics).
"""
