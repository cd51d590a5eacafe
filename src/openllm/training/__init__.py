"""Training: the options, building a run, the loop, its schedule, optimizer, metrics and records, torchrun.
May import every layer below it (core, data, model, checkpoint), never interop or inference."""
