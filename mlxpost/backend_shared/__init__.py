"""Numpy code both backends share; no framework is imported here.

Each module serves the backend modules of the same name in `mlxpost/mlx_backend/` and
`torch_backend/`, so what one backend computes the other computes from the same definition:

    sampling.py   prompt left-padding, the new-token budget, assembling `Samples`
    training.py   the learning-rate schedule, microbatch weights, skipping non-finite updates
    heads.py      the scalar head's initial weights (reward model, critic), read by modeling.py

Only backends (and their tests) import it, with one exception: the numpy oracle in
`mlxpost/parity.py` takes the learning rate from `training.learning_rate`, so it checks the
backends against the schedule they run.
"""
