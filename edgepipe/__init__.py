"""edgepipe, the application: the Python API, the commands, the demo, tables, plots and progress."""
