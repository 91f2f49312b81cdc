"""edgepipe library: configuration, models, partitioning, stages, codecs, wire, skip controller, traffic."""
