"""Tools for developing EdgeGAN from a checkout: a Mosquitto started from the shipped dev config, /proc
readers. Used by the test suite and edgegan.benchmarks; nothing else in edgegan imports this package."""
