"""synapse-serve: learnable synapses (ngclearn's) as a service."""

__version__ = "0.1.0"
NGCLEARN_VERSION = "3.2.3"  # the release whose numbers the kinds follow (docs/conformance.md)
