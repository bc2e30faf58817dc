"""Framework adapters (installed as ``vsa_nd.adapters``): ``vsa_nd.adapters.torch`` and
``vsa_nd.adapters.jax`` import their framework when they are imported (not before), and say which
extra to install where it is missing."""
