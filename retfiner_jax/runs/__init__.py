"""What any trainer needs, knowing no model, objective or data format: the workdir, its lock and resume check,
signals, checkpoints, the run log, the device mesh and shardings, the compilation cache."""
