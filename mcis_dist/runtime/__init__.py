"""What every stage runs on: paths and endpoints, the Ray session, the trainer, the sharded
actor pool, checkpoints, optimisers and metrics. Imports only config, storage, formats and the
maths below it; never a stage."""
