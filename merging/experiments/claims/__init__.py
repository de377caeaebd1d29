"""The claims benchmark (``merging claims``, ``make claims``): each paper's central claim read
on Fashion-MNIST class-group tasks as paired differences and rank correlations over
pre-registered seeds. :mod:`.protocol` reads the protocol file, :mod:`.pipeline` runs one
seed, :mod:`.analyses` holds its layer-gap and soup analyses, :mod:`.readout` turns records
into claims, :mod:`.run` is the command line."""
