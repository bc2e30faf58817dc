"""Framework adapters (installed as ``vsa_nd.adapters``): each module imports its framework only when used."""
