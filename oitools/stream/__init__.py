"""The live stream client (`python -m oitools.stream`), by section: client (options, the loop,
the entry point), sources (frames in), preprocess, sinks (frames out), stats."""
