"""The torch-free sweep launcher: commands, views, the engine, the sweep file, backends, the run store, input."""
