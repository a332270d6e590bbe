"""The application on top of the library: training loop, sampler, data, checkpoints, metrics, the
demo, studies and the `fastperc` command. It needs the `train` extra (`pip install 'fastperc[train]'`);
the library (`fastperc`, `fastperc.ops`, `fastperc.models`) never imports from here."""
